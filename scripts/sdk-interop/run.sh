#!/usr/bin/env bash
# Points the SDKs of the Terraform providers at a running emulator and exercises the grant calls:
#   gophertelekomcloud (Open Telekom Cloud provider): AK/SK (Credential= signing) and password
#   token, endpoints discovered through /v3/projects, /v3/auth/domains and /v3/auth/catalog;
#   huaweicloud-sdk-go-v3 (Huawei Cloud): AK/SK (Access= signing) against a fixed endpoint.
# Usage: scripts/sdk-interop/run.sh [BASE_URL]   (default http://127.0.0.1:8480, emulator defaults)
# Needs Go and the Go module proxy; not part of CI.
set -euo pipefail
base="${1:-http://127.0.0.1:8480}"
cd "$(dirname "$0")"
go run ./gophertelekomcloud "$base"
go run ./huaweicloud "$base"
