#!/usr/bin/env bash
# Builds the meshtun packages:
#     packaging/build.sh
# produces target/debian/meshtun_<version>-1_<arch>.deb and
# target/generate-rpm/meshtun-<version>-1.<arch>.rpm.
#
# Steps: release build of the binary; man pages and shell completions
# generated from the clap definitions (`meshtun generate-assets`) into
# target/assets/; then cargo-deb and cargo-generate-rpm, which read
# [package.metadata.deb] and [package.metadata.generate-rpm] in Cargo.toml.
# Installs cargo-deb and cargo-generate-rpm (cargo install --locked) when
# missing. Honours CARGO_TARGET_DIR for the build itself.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in cargo-deb cargo-generate-rpm; do
    if ! command -v "$tool" >/dev/null; then
        echo "build.sh: installing $tool"
        cargo install --locked "$tool"
    fi
done
for tool in strip gzip; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (apt-get install binutils gzip)" >&2; exit 1; }
done

target_dir="${CARGO_TARGET_DIR:-target}"
echo "build.sh: cargo build --release"
cargo build --release --locked --bin meshtun
bin="$target_dir/release/meshtun"

# Generated files live in ./target/assets whatever CARGO_TARGET_DIR is, because
# the package metadata names them relative to the project root.
assets=target/assets
rm -rf "$assets"
"$bin" generate-assets --out "$assets"
gzip -9n "$assets"/man/*.1
install -D -m 0755 "$bin" "$assets/bin/meshtun"
strip --strip-all "$assets/bin/meshtun"

rm -rf target/debian target/generate-rpm
mkdir -p target/debian target/generate-rpm
echo "build.sh: cargo deb"
cargo deb --no-build --locked --strip --output target/debian/
echo "build.sh: cargo generate-rpm"
cargo generate-rpm --output target/generate-rpm/

echo "build.sh: built"
ls -l target/debian/*.deb target/generate-rpm/*.rpm
