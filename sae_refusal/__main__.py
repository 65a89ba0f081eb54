"""``python -m sae_refusal ...``: the ``sae-refusal`` command (same dispatch, same one-line errors)."""

from sae_refusal.cli import main

if __name__ == "__main__":
    main()
