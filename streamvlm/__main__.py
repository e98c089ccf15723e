from streamvlm.cli import main

raise SystemExit(main())
