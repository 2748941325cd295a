from shim.boot.cli import run

run()
