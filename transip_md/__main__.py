"""``python -m transip_md COMMAND ...``: the same as the ``transip-md`` command."""

from .console import entry

if __name__ == "__main__":
    entry()
