#!/usr/bin/env bash
# Builds the edge-tunnel images with podman from this checkout, with no
# registry and no network for the build itself:
#
#   1. release binaries built on this host (stripped copies in
#      target/images/bin-ARCH), cross-compiled for other architectures;
#   2. two bases unpacked from Debian packages of the same release as this
#      host, so their glibc is the one the binaries were linked against:
#      `runtime` (libc6, libgcc-s1, netbase, /etc/passwd with uid 65532)
#      and `dnat` (the same plus iptables and conntrack with their
#      libraries);
#   3. docker/Dockerfile with BINARIES=prebuilt on those bases (the final
#      stages only COPY, so a foreign architecture needs no emulation).
#
#   bash docker/build-images.sh                       # this host's architecture
#   ARCHES="amd64 arm64" bash docker/build-images.sh  # and arm64 (cross)
#   IMAGE_PREFIX=registry.example.com/edge bash docker/build-images.sh
#
# Tags: $IMAGE_PREFIX/edge-tunnel:VERSION and
# $IMAGE_PREFIX/edge-tunnel-dnat:VERSION for this host's architecture (the
# names the kustomize base uses; VERSION from Cargo.toml's
# workspace.package, IMAGE_PREFIX defaults to localhost), and
# ...:VERSION-ARCH for every architecture built. Prints each image's name
# and size. Installs podman and runc (and, for arm64, the cross compiler
# and the foreign Debian architecture) with apt-get when they are missing.
# SKIP_CARGO_BUILD=1 packages the binaries already built for the host
# (target/release).
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
[ -n "$version" ] || { echo "no workspace version in Cargo.toml" >&2; exit 1; }
prefix=${IMAGE_PREFIX:-localhost}
work=target/images
mkdir -p "$work"

# shellcheck source=docker/podman-env.sh
source docker/podman-env.sh

host_arch=$(dpkg --print-architecture)
arches=${ARCHES:-$host_arch}
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"

# binaries ARCH: the three binaries for ARCH, stripped, in target/images/bin-ARCH.
binaries() {
    local arch=$1 triple objcopy=objcopy dir
    case $arch in
        amd64) triple=x86_64-unknown-linux-gnu ;;
        arm64) triple=aarch64-unknown-linux-gnu ;;
        *) echo "unsupported architecture $arch (amd64, arm64)" >&2; exit 1 ;;
    esac
    if [ "$arch" = "$host_arch" ]; then
        if [ "${SKIP_CARGO_BUILD:-}" != "1" ]; then
            cargo build --release --locked -p tunnel-server -p tunnel-agent -p certs --bins
        fi
        dir=target/release
    else
        local gnu=${triple/-unknown-/-}
        if ! command -v "$gnu-gcc" >/dev/null 2>&1; then
            echo "==> installing the $arch cross compiler (apt-get)"
            DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends \
                "gcc-$gnu" "libc6-dev-$arch-cross" >/dev/null
        fi
        rustup target add "$triple" >/dev/null 2>&1 || true
        local up=${triple^^}
        env "CARGO_TARGET_${up//-/_}_LINKER=$gnu-gcc" "CC_${triple//-/_}=$gnu-gcc" \
            cargo build --release --locked --target "$triple" -p tunnel-server -p tunnel-agent -p certs --bins
        dir=target/$triple/release
        objcopy=$gnu-objcopy
    fi
    rm -rf "$work/bin-$arch"
    mkdir -p "$work/bin-$arch"
    local b
    for b in tunnel-server tunnel-agent tunnel-certs; do
        # Line tables are for backtraces on this host; the images ship without.
        "$objcopy" --strip-debug "$dir/$b" "$work/bin-$arch/$b"
    done
}

# make_base NAME PACKAGE...: a base image from these Debian packages and
# what they depend on, unpacked (no maintainer scripts run).
make_base() {
    local name=$1 arch=$2
    shift 2
    local dir=$work/base-$name-$arch
    rm -rf "$dir"
    mkdir -p "$dir/debs" "$dir/root"
    # Architecture-independent packages (netbase) have no NAME:ARCH.
    local p wanted=()
    for p in "$@"; do
        if [ "$(apt-cache show --no-all-versions "$p" | sed -n 's/^Architecture: //p' | head -1)" = all ]; then
            wanted+=("$p")
        else
            wanted+=("$p:$arch")
        fi
    done
    local pkgs
    pkgs=$(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances "${wanted[@]}" | grep -v '^[ <]' | sort -u)
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
        podman import --quiet --arch "$arch" - "localhost/edge-tunnel-base-$name:$version-$arch" >/dev/null
    echo "    localhost/edge-tunnel-base-$name:$version-$arch ($(echo $pkgs | wc -w) packages)"
}

build() {
    local target=$1 image=$2 arch=$3
    podman build --quiet --pull=never --network none --platform "linux/$arch" -f docker/Dockerfile \
        --build-arg BINARIES=prebuilt --build-arg "PREBUILT=target/images/bin-$arch" \
        --build-arg "RUNTIME_BASE=localhost/edge-tunnel-base-runtime:$version-$arch" \
        --build-arg "DNAT_RUNTIME=localhost/edge-tunnel-base-dnat:$version-$arch" \
        --target "$target" -t "$image:$version-$arch" . >/dev/null
    if [ "$arch" = "$host_arch" ]; then
        podman tag "$image:$version-$arch" "$image:$version"
    fi
}

images=()
for arch in $arches; do
    echo "==> $arch: release binaries"
    binaries "$arch"
    if [ "$arch" != "$host_arch" ] && ! grep -qx "$arch" <<<"$(dpkg --print-foreign-architectures)"; then
        echo "==> adding the Debian architecture $arch (dpkg, apt-get update)"
        $sudo dpkg --add-architecture "$arch"
        $sudo apt-get update -qq
    fi
    echo "==> $arch: bases from Debian packages"
    make_base runtime "$arch" libc6 libgcc-s1 netbase
    make_base dnat "$arch" libc6 libgcc-s1 netbase iptables conntrack
    echo "==> $arch: images"
    build tunnel "$prefix/edge-tunnel" "$arch"
    build tunnel-dnat "$prefix/edge-tunnel-dnat" "$arch"
    images+=("$prefix/edge-tunnel:$version-$arch" "$prefix/edge-tunnel-dnat:$version-$arch")
done
for image in "${images[@]}"; do
    bytes=$(podman image inspect --format '{{.Size}}' "$image")
    awk -v i="$image" -v b="$bytes" 'BEGIN { printf "    %-45s %6.1f MB\n", i, b / 1e6 }'
done
