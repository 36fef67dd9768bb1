"""``python -m igw_common.config`` prints docs/configuration.md (``make docs`` writes it; a test keeps it in sync)."""

from igw_common.config import reference_page

print(reference_page(), end="")
