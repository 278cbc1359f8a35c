from cxr.cli import main

raise SystemExit(main())
