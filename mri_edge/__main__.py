"""`python -m mri_edge`: the mri-edge command."""

from .cli import main

main()
