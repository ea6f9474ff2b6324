import signal

from pipeline.cli import main

# `kill` stops a command as Ctrl-C does: workers interrupted, temporary files removed, exit 130
signal.signal(signal.SIGTERM, signal.default_int_handler)
raise SystemExit(main())
