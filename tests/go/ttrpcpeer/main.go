// Command ttrpcpeer is the Go side of pyshim's ttrpc interoperability tests and
// benchmark. It links Debian's github.com/containerd/ttrpc (the 1.1 line that
// containerd 1.6 uses) and only gogo well-known types, so it needs no generated code.
//
//	ttrpcpeer server -socket PATH             serve pyshim.test.v1.Echo; prints "READY"
//	ttrpcpeer client -socket PATH             run the interop suite; one JSON line per case
//	ttrpcpeer bench  -socket PATH -calls N    latency + throughput of Echo; one JSON line
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const service = "pyshim.test.v1.Echo"

func main() {
	if len(os.Args) < 2 {
		fatalf("usage: ttrpcpeer server|client|bench -socket PATH")
	}
	mode := os.Args[1]
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	socket := fs.String("socket", "", "unix socket path")
	calls := fs.Int("calls", 1000, "bench: number of calls per phase")
	concurrency := fs.Int("concurrency", 16, "bench: calls in flight in the throughput phase")
	payloadSize := fs.Int("payload", 16, "bench: Echo payload bytes")
	_ = fs.Parse(os.Args[2:])
	if *socket == "" {
		fatalf("-socket is required")
	}
	switch mode {
	case "server":
		serve(*socket)
	case "client":
		runSuite(dial(*socket))
	case "bench":
		bench(dial(*socket), *calls, *concurrency, *payloadSize)
	default:
		fatalf("unknown mode %q", mode)
	}
}

func fatalf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "ttrpcpeer: "+format+"\n", args...)
	os.Exit(2)
}

// ---------------------------------------------------------------- server

func serve(path string) {
	_ = os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		fatalf("listen: %v", err)
	}
	srv, err := ttrpc.NewServer(ttrpc.WithServerHandshaker(ttrpc.UnixSocketRequireSameUser()))
	if err != nil {
		fatalf("server: %v", err)
	}
	srv.Register(service, map[string]ttrpc.Method{
		"Echo":     echo,
		"Sleep":    sleep,
		"Fail":     fail,
		"Metadata": metadata,
		"Deadline": deadline,
	})
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		srv.Close()
		os.Exit(0)
	}()
	fmt.Println("READY")
	if err := srv.Serve(context.Background(), l); err != nil && !errors.Is(err, ttrpc.ErrServerClosed) {
		fatalf("serve: %v", err)
	}
}

func echo(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
	var req types.BytesValue
	if err := unmarshal(&req); err != nil {
		return nil, err
	}
	return &req, nil
}

// sleep waits req.Value milliseconds, or until the request's deadline passes.
func sleep(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
	var req types.Int64Value
	if err := unmarshal(&req); err != nil {
		return nil, err
	}
	select {
	case <-time.After(time.Duration(req.Value) * time.Millisecond):
		return &req, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// fail answers with the status "<code> <message>" given in the request.
func fail(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
	var req types.StringValue
	if err := unmarshal(&req); err != nil {
		return nil, err
	}
	parts := strings.SplitN(req.Value, " ", 2)
	code, err := strconv.Atoi(parts[0])
	if err != nil || len(parts) != 2 {
		return nil, status.Errorf(codes.InvalidArgument, "want \"<code> <message>\", got %q", req.Value)
	}
	return nil, status.Error(codes.Code(code), parts[1])
}

func metadata(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
	var req types.Empty
	if err := unmarshal(&req); err != nil {
		return nil, err
	}
	md, _ := ttrpc.GetMetadata(ctx)
	out := map[string][]string(md)
	if out == nil {
		out = map[string][]string{}
	}
	b, _ := json.Marshal(out)
	return &types.StringValue{Value: string(b)}, nil
}

type deadlineInfo struct {
	HasDeadline bool    `json:"has_deadline"`
	RemainingMs float64 `json:"remaining_ms"`
}

func deadline(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
	var req types.Empty
	if err := unmarshal(&req); err != nil {
		return nil, err
	}
	info := deadlineInfo{}
	if dl, ok := ctx.Deadline(); ok {
		info.HasDeadline = true
		info.RemainingMs = float64(time.Until(dl)) / float64(time.Millisecond)
	}
	b, _ := json.Marshal(info)
	return &types.StringValue{Value: string(b)}, nil
}

// ---------------------------------------------------------------- client

func dial(path string) *ttrpc.Client {
	conn, err := net.Dial("unix", path)
	if err != nil {
		fatalf("dial: %v", err)
	}
	return ttrpc.NewClient(conn)
}

type result map[string]interface{}

func emit(r result) {
	b, err := json.Marshal(r)
	if err != nil {
		fatalf("json: %v", err)
	}
	fmt.Println(string(b))
}

// errorResult reports an error as the status the Go client saw.
func errorResult(name string, err error) result {
	r := result{"case": name, "ok": err == nil}
	if err != nil {
		st, _ := status.FromError(err)
		r["code"] = int(st.Code())
		r["message"] = st.Message()
		r["error"] = err.Error()
	}
	return r
}

func runSuite(c *ttrpc.Client) {
	defer c.Close()
	bg := context.Background()

	// Concurrent calls sent in the order slowest first; they must come back
	// fastest first over the one connection.
	{
		type done struct {
			name string
			err  error
			val  int64
		}
		ch := make(chan done, 4)
		var wg sync.WaitGroup
		for _, ms := range []int64{600, 400, 200, 0} {
			wg.Add(1)
			go func(ms int64) {
				defer wg.Done()
				var resp types.Int64Value
				err := c.Call(bg, service, "Sleep", &types.Int64Value{Value: ms}, &resp)
				ch <- done{fmt.Sprintf("sleep%d", ms), err, resp.Value}
			}(ms)
			time.Sleep(30 * time.Millisecond)
		}
		wg.Wait()
		close(ch)
		order := []string{}
		values := map[string]int64{}
		var firstErr error
		for d := range ch {
			order = append(order, d.name)
			values[d.name] = d.val
			if d.err != nil && firstErr == nil {
				firstErr = d.err
			}
		}
		r := errorResult("concurrent", firstErr)
		r["order"] = order
		r["values"] = values
		emit(r)
	}

	{
		payload := make([]byte, 1<<20)
		for i := range payload {
			payload[i] = byte(i * 7)
		}
		var resp types.BytesValue
		err := c.Call(bg, service, "Echo", &types.BytesValue{Value: payload}, &resp)
		sum := sha256.Sum256(resp.Value)
		want := sha256.Sum256(payload)
		r := errorResult("echo_large", err)
		r["len"] = len(resp.Value)
		r["intact"] = hex.EncodeToString(sum[:]) == hex.EncodeToString(want[:])
		emit(r)
	}

	for _, spec := range []string{"5 container not created: not found", "9 précondition ✗ failed"} {
		var resp types.Empty
		err := c.Call(bg, service, "Fail", &types.StringValue{Value: spec}, &resp)
		r := errorResult("fail", err)
		r["request"] = spec
		emit(r)
	}

	{
		var resp types.Empty
		emit(errorResult("unknown_method", c.Call(bg, service, "Bogus", &types.Empty{}, &resp)))
		emit(errorResult("unknown_service", c.Call(bg, "foo.Bar", "Echo", &types.Empty{}, &resp)))
	}

	{
		md := ttrpc.MD{}
		md.Set("containerd-namespace-ttrpc", "default")
		md.Append("x-multi", "one", "two")
		var resp types.StringValue
		err := c.Call(ttrpc.WithMetadata(bg, md), service, "Metadata", &types.Empty{}, &resp)
		r := errorResult("metadata", err)
		r["received"] = json.RawMessage(orNull(resp.Value))
		emit(r)
	}

	for _, timeout := range []time.Duration{0, 2 * time.Second} {
		ctx, cancel := bg, context.CancelFunc(func() {})
		if timeout > 0 {
			ctx, cancel = context.WithTimeout(bg, timeout)
		}
		var resp types.StringValue
		err := c.Call(ctx, service, "Deadline", &types.Empty{}, &resp)
		cancel()
		r := errorResult("deadline", err)
		r["timeout_ms"] = timeout.Milliseconds()
		r["received"] = json.RawMessage(orNull(resp.Value))
		emit(r)
	}

	{
		ctx, cancel := context.WithTimeout(bg, 300*time.Millisecond)
		start := time.Now()
		var resp types.Int64Value
		err := c.Call(ctx, service, "Sleep", &types.Int64Value{Value: 5000}, &resp)
		cancel()
		r := errorResult("deadline_exceeded", err)
		r["elapsed_ms"] = time.Since(start).Milliseconds()
		r["is_deadline"] = errors.Is(err, context.DeadlineExceeded)
		emit(r)
	}

	// The connection must still be usable after all of the above.
	{
		var resp types.BytesValue
		err := c.Call(bg, service, "Echo", &types.BytesValue{Value: []byte("still alive")}, &resp)
		r := errorResult("after", err)
		r["value"] = string(resp.Value)
		emit(r)
	}
}

func orNull(s string) string {
	if s == "" {
		return "null"
	}
	return s
}

// ---------------------------------------------------------------- bench

func bench(c *ttrpc.Client, calls, concurrency, size int) {
	defer c.Close()
	bg := context.Background()
	payload := make([]byte, size)
	call := func() {
		var resp types.BytesValue
		if err := c.Call(bg, service, "Echo", &types.BytesValue{Value: payload}, &resp); err != nil {
			fatalf("call: %v", err)
		}
	}
	for i := 0; i < calls/10+1; i++ { // warm-up
		call()
	}
	lat := make([]float64, calls)
	for i := range lat {
		t := time.Now()
		call()
		lat[i] = float64(time.Since(t)) / float64(time.Microsecond)
	}
	sort.Float64s(lat)

	var wg sync.WaitGroup
	work := make(chan struct{}, calls)
	for i := 0; i < calls; i++ {
		work <- struct{}{}
	}
	close(work)
	start := time.Now()
	for w := 0; w < concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range work {
				call()
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	emit(result{
		"calls":          calls,
		"concurrency":    concurrency,
		"median_us":      lat[len(lat)/2],
		"p99_us":         lat[(len(lat)*99)/100],
		"throughput_cps": float64(calls) / elapsed,
	})
}
