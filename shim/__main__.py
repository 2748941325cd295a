from shim.cli import run

run()
