"""python -m qtx.weights: see qtx.weights.cli."""
from qtx.weights.cli import main

raise SystemExit(main())
