/*
 * LD_PRELOAD for the User-Mode Linux kernel (scripts/vm.sh): makes UML's ptrace
 * transfers of the x86 extended FPU state (NT_X86_XSTATE) work on hosts whose
 * xstate is larger than the buffer UML passes, e.g. with AMX tile data.
 *
 * The host kernel refuses PTRACE_SETREGSET of NT_X86_XSTATE unless the buffer is
 * exactly its own xstate size (EFAULT: UML then dies at its first user process,
 * "userspace - ptrace set fp regs failed, errno = 14"). Here a short buffer is
 * carried in a host-sized one: reads copy the first part back; writes send the
 * caller's part with every component that lies past it marked as in its initial
 * state (those are the host's extras, which a UML process cannot have enabled).
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#define BIG (64 * 1024)
#define XSTATE_BV_OFFSET 512 /* the XSAVE header follows the 512-byte legacy area */

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

static ptrace_fn real_ptrace;
static size_t host_size; /* the host's NT_X86_XSTATE size, learnt on first use */

static long call_real(int request, pid_t pid, void *addr, void *data)
{
    if (!real_ptrace)
        real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    return real_ptrace(request, pid, addr, data);
}

static int learn_size(pid_t pid)
{
    if (host_size)
        return 0;
    void *buf = calloc(1, BIG);
    struct iovec iov = {buf, BIG};
    if (!buf)
        return -1;
    long r = call_real(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &iov);
    if (r == 0)
        host_size = iov.iov_len;
    free(buf);
    if (getenv("PYSHIM_UML_XSTATE_DEBUG"))
        fprintf(stderr, "uml-xstate: host xstate size %zu\n", host_size);
    return r == 0 ? 0 : -1;
}

/*
 * Standard-format xstate components that end past `len`: cleared from xstate_bv.
 * CPUID is a trap to the hypervisor on a virtual host, and this runs at every
 * context switch of the guest: asked once per length (UML always passes one).
 */
static uint64_t components_past(size_t len)
{
    static size_t cached_len;
    static uint64_t cached_mask;
    if (len == cached_len)
        return cached_mask;
    uint64_t mask = 0;
    for (unsigned i = 2; i < 64; i++) {
        unsigned eax, ebx, ecx, edx;
        __cpuid_count(0xd, i, eax, ebx, ecx, edx);
        if (eax && (size_t)ebx + eax > len)
            mask |= 1ULL << i;
    }
    cached_len = len;
    cached_mask = mask;
    return mask;
}

long ptrace(enum __ptrace_request request, ...)
{
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);

    if ((request != PTRACE_GETREGSET && request != PTRACE_SETREGSET) ||
        (uintptr_t)addr != NT_X86_XSTATE || learn_size(pid) != 0)
        return call_real(request, pid, addr, data);
    struct iovec *iov = data;
    if (iov->iov_len >= host_size)
        return call_real(request, pid, addr, data);

    size_t len = iov->iov_len;
    static __thread char *buf;
    if (!buf && !(buf = malloc(host_size))) {
        errno = ENOMEM;
        return -1;
    }
    memset(buf, 0, host_size);
    struct iovec big = {buf, host_size};
    long r;
    if (request == PTRACE_GETREGSET) {
        r = call_real(request, pid, addr, &big);
        if (r == 0)
            memcpy(iov->iov_base, buf, len < big.iov_len ? len : big.iov_len);
    } else {
        memcpy(buf, iov->iov_base, len);
        if (len >= XSTATE_BV_OFFSET + 8) {
            uint64_t bv;
            memcpy(&bv, buf + XSTATE_BV_OFFSET, 8);
            bv &= ~components_past(len);
            memcpy(buf + XSTATE_BV_OFFSET, &bv, 8);
        }
        r = call_real(request, pid, addr, &big);
    }
    return r;
}
