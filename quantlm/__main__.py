from quantlm.cli import run

run()
