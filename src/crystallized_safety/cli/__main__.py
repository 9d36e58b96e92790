"""`python -m crystallized_safety.cli ...` runs `csafety`."""

from crystallized_safety.cli import main

main()
