from slurmvision.cli import main

raise SystemExit(main())
