"""The command line: argv -> one library call -> one line and an exit code."""
