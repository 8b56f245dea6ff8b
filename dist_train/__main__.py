from dist_train.cli import main

raise SystemExit(main())
