"""Generated gRPC code of `protos/tandem/v1` (built by `tandem._proto.build`, never edited by hand)."""
from __future__ import annotations

from tandem._proto.build import ensure_built

ensure_built()
