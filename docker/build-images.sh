#!/usr/bin/env bash
# Builds the edge-tunnel images with podman from this checkout, with no
# registry and no network for the build itself:
#
#   1. release binaries built on this host (stripped copies in
#      target/images/bin);
#   2. two bases unpacked from this host's Debian packages, so their glibc
#      is the one the binaries were linked against: `runtime` (libc6,
#      libgcc-s1, netbase, /etc/passwd with uid 65532) and `dnat` (the same
#      plus iptables and conntrack with their libraries);
#   3. docker/Dockerfile with BINARIES=prebuilt on those bases.
#
#   bash docker/build-images.sh
#   IMAGE_PREFIX=registry.example.com/edge bash docker/build-images.sh
#
# Tags: $IMAGE_PREFIX/edge-tunnel:VERSION and
# $IMAGE_PREFIX/edge-tunnel-dnat:VERSION (VERSION from Cargo.toml's
# workspace.package; IMAGE_PREFIX defaults to localhost), the names the
# kustomize base uses. Prints each image's name and size. Installs podman
# and runc with apt-get when they are missing. Set SKIP_CARGO_BUILD=1 to
# package binaries already in target/release.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "no workspace version in Cargo.toml" >&2; exit 1; }
prefix=${IMAGE_PREFIX:-localhost}
work=target/images
mkdir -p "$work"

# shellcheck source=docker/podman-env.sh
source docker/podman-env.sh

echo "==> release binaries"
if [ "${SKIP_CARGO_BUILD:-}" != "1" ]; then
    cargo build --release --locked -p tunnel-server -p tunnel-agent -p certs --bins
fi
rm -rf "$work/bin"
mkdir -p "$work/bin"
for b in tunnel-server tunnel-agent tunnel-certs; do
    # Line tables are for backtraces on this host; the images ship without.
    objcopy --strip-debug "target/release/$b" "$work/bin/$b"
done

# make_base NAME PACKAGE...: a base image from these Debian packages and
# what they depend on, unpacked (no maintainer scripts run).
make_base() {
    local name=$1
    shift
    local dir=$work/base-$name
    rm -rf "$dir"
    mkdir -p "$dir/debs" "$dir/root"
    local pkgs
    pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "$@" | grep -v '^ ' | grep -v '^<' | sort -u)
    # apt-get download warns when the _apt user cannot write here; harmless.
    (cd "$dir/debs" && apt-get download -qq $pkgs 2>&1 | { grep -v "unsandboxed" >&2 || true; })
    local deb
    for deb in "$dir"/debs/*.deb; do
        dpkg-deb -x "$deb" "$dir/root"
    done
    # What a runtime never reads: documentation, locales, charset
    # converters, maintainer tooling.
    rm -rf "$dir/root/usr/share/"{doc,man,info,locale,lintian,bug,common-licenses} \
        "$dir"/root/usr/lib/*/gconv "$dir/root/usr/lib/x86_64-linux-gnu/audit" \
        "$dir/root/usr/share/i18n" "$dir/root/sbin/ldconfig" "$dir/root/usr/bin/"{ldd,iconv,getconf,getent,locale,localedef,pldd,tzselect,zdump,catchsegv,sotruss,sprof,gencat,mtrace,xtrace} \
        "$dir/root/usr/sbin/"{iconvconfig,zic} 2>/dev/null || true
    mkdir -p "$dir/root/etc" "$dir/root/tmp" "$dir/root/usr/local/bin"
    chmod 1777 "$dir/root/tmp"
    printf 'root:x:0:0:root:/root:/nonexistent\nnonroot:x:65532:65532:nonroot:/home/nonroot:/nonexistent\n' \
        >"$dir/root/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/root/etc/group"
    printf 'hosts: files dns\n' >"$dir/root/etc/nsswitch.conf"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$dir/root" -c . |
        podman import --quiet - "localhost/edge-tunnel-base-$name:$version" >/dev/null
    echo "    localhost/edge-tunnel-base-$name:$version ($(echo $pkgs | wc -w) packages)"
}

echo "==> bases from Debian packages"
make_base runtime libc6 libgcc-s1 netbase
make_base dnat libc6 libgcc-s1 netbase iptables conntrack

build() {
    local target=$1 image=$2
    shift 2
    podman build --quiet --pull=never --network none -f docker/Dockerfile \
        --build-arg BINARIES=prebuilt \
        --build-arg "RUNTIME_BASE=localhost/edge-tunnel-base-runtime:$version" \
        --build-arg "DNAT_RUNTIME=localhost/edge-tunnel-base-dnat:$version" \
        --target "$target" -t "$image" . >/dev/null
}

echo "==> images"
build tunnel "$prefix/edge-tunnel:$version"
build tunnel-dnat "$prefix/edge-tunnel-dnat:$version"
for image in "$prefix/edge-tunnel:$version" "$prefix/edge-tunnel-dnat:$version"; do
    bytes=$(podman image inspect --format '{{.Size}}' "$image")
    awk -v i="$image" -v b="$bytes" 'BEGIN { printf "    %-45s %6.1f MB\n", i, b / 1e6 }'
done
