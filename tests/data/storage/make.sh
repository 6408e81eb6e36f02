#!/bin/sh
# The schemas of devtrust before numbered migrations (meta schema_version 1), extracted from
# verifier/store.py in the repository's history: tests/test_storage_migrations.py makes
# databases with them, as those releases did, and checks that today's code upgrades them.
#   schema-v1.sql:         the last before migrations (issue 8)
#   schema-v1-issue6.sql:  before issue 7 (tokens without zone and labels, no event_log_parts)
set -eu
cd "$(dirname "$0")"
extract() {
    git show "$1:verifier/store.py" | sed -n '/^_SCHEMA = """$/,/^"""$/p' | sed '1d;$d' >"$2"
}
extract 8d456cd schema-v1.sql
extract 10981ae schema-v1-issue6.sql
