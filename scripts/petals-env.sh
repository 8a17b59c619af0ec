#!/usr/bin/env bash
# The Petals environment recipe ships inside the package (core/engines/petals/petals-env.sh) so
# that `provision --petals` finds it after a plain `pip install`; this is its entry from a clone.
exec "$(dirname "$0")/../core/engines/petals/petals-env.sh" "$@"
