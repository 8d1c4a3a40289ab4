from nucleus.cli import main

raise SystemExit(main())
