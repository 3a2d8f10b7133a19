#!/usr/bin/env bash
# test_install.sh: st_proactor as its users get it. Run by `make test-install` from a built tree.
#
# `make install` into a temporary prefix; the "Use from C" program of README.md built against
# that install only (pkg-config; CMake's find_package, shared and static targets; a fully
# static link with pkg-config --static) and the "Use from C++" program (pkg-config), each run on
# every backend, each checking that its header's version is the library's; a program built
# with a header of another version must refuse to run; a staged DESTDIR install; both chat
# servers started without LD_LIBRARY_PATH; `make uninstall` leaving each prefix empty.
# Environment: MAKE, CC, CXX, PYTHON, BACKENDS; CMAKE_REQUIRED=1 makes a missing cmake an
# error instead of a skip. Everything lives in one temporary directory, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

MAKE=${MAKE:-make}
CC=${CC:-cc}
CXX=${CXX:-c++}
PYTHON=${PYTHON:-python3}
BACKENDS=${BACKENDS:-epoll uring}
VERSION=$(sed -n 's/^version = "\([^"]*\)"/\1/p' Cargo.toml | head -n 1)
MAJOR=${VERSION%%.*}
MINOR=${VERSION#*.}
MINOR=${MINOR%%.*}

work=$(mktemp -d /tmp/st_proactor_install.XXXXXX)
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix
# Programs below may find the library only through what they were built with.
unset LD_LIBRARY_PATH CMAKE_PREFIX_PATH
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig

fail() {
    echo "test-install: FAIL $*"
    exit 1
}
ok() { echo "test-install: ok   $*"; }

# The first ```LANG block of README.md's section "## TITLE".
readme_block() {
    awk -v title="## $1" -v fence="\`\`\`$2" '
        /^## / { in_section = ($0 == title) }
        in_section && $0 == fence && !done { inside = 1; next }
        inside && /^```/ { inside = 0; done = 1 }
        inside' README.md
}

# Runs PROGRAM on every backend; its output must be EXPECTED.
run_everywhere() {
    local program=$1 expected=$2 what=$3 backend out
    for backend in $BACKENDS; do
        out=$(ST_PROACTOR_BACKEND=$backend "$program" 2>&1) || fail "$what ($backend): exit status $?: $out"
        [ "$out" = "$expected" ] || fail "$what ($backend) printed '$out', want '$expected'"
    done
    ok "$what runs ($BACKENDS)"
}

# PROGRAM must load the library from the prefix: one NEEDED libst_proactor.so.MAJOR, resolved
# there.
loads_installed() {
    local resolved
    resolved=$(ldd "$1" | awk '/libst_proactor/ { print $3 }')
    [ "$resolved" = "$prefix/lib/libst_proactor.so.$MAJOR" ] || fail "$1 loads '$resolved'"
}

# --- install ------------------------------------------------------------------------------
$MAKE --no-print-directory install PREFIX="$prefix" > "$work/install.log" 2>&1 ||
    { cat "$work/install.log"; fail "make install PREFIX=$prefix"; }
expected_files="./include
./include/st_proactor.h
./include/st_proactor.hpp
./lib
./lib/cmake
./lib/cmake/st_proactor
./lib/cmake/st_proactor/st_proactor-config-version.cmake
./lib/cmake/st_proactor/st_proactor-config.cmake
./lib/libst_proactor.a
./lib/libst_proactor.so
./lib/libst_proactor.so.$MAJOR
./lib/libst_proactor.so.$VERSION
./lib/pkgconfig
./lib/pkgconfig/st_proactor.pc"
installed=$(cd "$prefix" && find . -mindepth 1 | LC_ALL=C sort)
[ "$installed" = "$expected_files" ] || fail "installed files:"$'\n'"$installed"
[ "$(readlink "$prefix/lib/libst_proactor.so")" = "libst_proactor.so.$MAJOR" ] || fail "dev link"
[ "$(readlink "$prefix/lib/libst_proactor.so.$MAJOR")" = "libst_proactor.so.$VERSION" ] ||
    fail "SONAME link"
readelf -d "$prefix/lib/libst_proactor.so.$VERSION" | grep -q "SONAME.*\[libst_proactor.so.$MAJOR\]" ||
    fail "the installed library lacks the SONAME libst_proactor.so.$MAJOR"
cmp -s include/st_proactor.h "$prefix/include/st_proactor.h" || fail "installed header differs"
[ "$(pkg-config --modversion st_proactor)" = "$VERSION" ] || fail "pkg-config --modversion"
ok "make install PREFIX=$prefix: $(echo "$installed" | wc -l) entries, SONAME libst_proactor.so.$MAJOR"

# --- C and C++ through pkg-config -----------------------------------------------------------
mkdir -p "$work/c" "$work/cpp"
readme_block "Use from C" c > "$work/c/hello.c"
readme_block "Use from C++" cpp > "$work/cpp/hello.cpp"
[ -s "$work/c/hello.c" ] && [ -s "$work/cpp/hello.cpp" ] || fail "README examples not found"
libdir=$(pkg-config --variable=libdir st_proactor)
greeting="st_proactor $VERSION: hello"

# shellcheck disable=SC2046 # pkg-config's flags are meant to be split
$CC -Wall -Wextra -Werror -o "$work/c/hello" "$work/c/hello.c" \
    $(pkg-config --cflags --libs st_proactor) -Wl,-rpath,"$libdir" || fail "C build with pkg-config"
loads_installed "$work/c/hello"
run_everywhere "$work/c/hello" "$greeting" "C program built with pkg-config"

# The same program compiled with the header of another version must refuse to run.
mkdir -p "$work/other/include"
sed "s/^#define ST_PROACTOR_VERSION_STRING .*/#define ST_PROACTOR_VERSION_STRING \"$MAJOR.99.0\"/" \
    "$prefix/include/st_proactor.h" > "$work/other/include/st_proactor.h"
# shellcheck disable=SC2046
$CC -Wall -Wextra -Werror -I"$work/other/include" -o "$work/other/hello" "$work/c/hello.c" \
    $(pkg-config --cflags --libs st_proactor) -Wl,-rpath,"$libdir" || fail "C build, other header"
if out=$("$work/other/hello" 2>&1); then fail "a version mismatch went unnoticed: $out"; fi
[ "$out" = "built with st_proactor $MAJOR.99.0, running with $VERSION" ] || fail "mismatch: $out"
ok "a program built with another version's header refuses to run"

# shellcheck disable=SC2046
$CXX -std=c++17 -Wall -Wextra -Werror -o "$work/cpp/hello" "$work/cpp/hello.cpp" \
    $(pkg-config --cflags --libs st_proactor) -Wl,-rpath,"$libdir" || fail "C++ build with pkg-config"
loads_installed "$work/cpp/hello"
run_everywhere "$work/cpp/hello" "removeHandler: No such file or directory
$greeting" "C++ program built with pkg-config"

# --- static, through pkg-config --static ----------------------------------------------------
# shellcheck disable=SC2046
$CC -static -Wall -Wextra -Werror -o "$work/c/hello_static" "$work/c/hello.c" \
    $(pkg-config --static --cflags --libs st_proactor) > "$work/static.log" 2>&1 ||
    { cat "$work/static.log"; fail "static C build with pkg-config --static"; }
if readelf -d "$work/c/hello_static" 2>/dev/null | grep -q NEEDED; then
    fail "the static program needs shared libraries"
fi
run_everywhere "$work/c/hello_static" "$greeting" "C program linked statically (pkg-config --static)"

# --- CMake ------------------------------------------------------------------------------------
if command -v cmake > /dev/null 2>&1; then
    cmake_build() { # NAME CMAKELISTS_TEXT: configures and builds hello.c; 0 when it worked
        mkdir -p "$work/$1/src"
        printf '%s\n' "$2" > "$work/$1/src/CMakeLists.txt"
        cp "$work/c/hello.c" "$work/$1/src/"
        cmake -S "$work/$1/src" -B "$work/$1/build" -DCMAKE_PREFIX_PATH="$prefix" \
            -DCMAKE_C_COMPILER="$CC" -DCMAKE_C_FLAGS="-Wall -Wextra -Werror" \
            > "$work/$1/log" 2>&1 && cmake --build "$work/$1/build" >> "$work/$1/log" 2>&1
    }
    lists=$(readme_block "Use from C" cmake)
    [ -n "$lists" ] || fail "README's CMakeLists.txt not found"
    cmake_build cmake "$lists" || { cat "$work/cmake/log"; fail "CMake build (find_package)"; }
    loads_installed "$work/cmake/build/hello"
    run_everywhere "$work/cmake/build/hello" "$greeting" "C program built by CMake (st_proactor::st_proactor)"

    static_lists=${lists//st_proactor::st_proactor)/st_proactor::st_proactor_static)}
    [ "$static_lists" != "$lists" ] || fail "README's CMakeLists.txt has no st_proactor::st_proactor)"
    cmake_build cmake_static "$static_lists" || { cat "$work/cmake_static/log"; fail "CMake static build"; }
    if ldd "$work/cmake_static/build/hello" | grep -q libst_proactor; then
        fail "the st_proactor_static program loads libst_proactor.so"
    fi
    run_everywhere "$work/cmake_static/build/hello" "$greeting" \
        "C program built by CMake (st_proactor::st_proactor_static)"

    newer="find_package(st_proactor $MAJOR.$((MINOR + 1)) CONFIG REQUIRED)"
    newer_lists=$(printf '%s\n' "$lists" | sed "s/^find_package(st_proactor .*/$newer/")
    if cmake_build cmake_newer "$newer_lists"; then fail "CMake accepted a request for $MAJOR.$((MINOR + 1))"; fi
    grep -q "$VERSION" "$work/cmake_newer/log" || fail "CMake's refusal does not name $VERSION"
    ok "CMake refuses a request for a newer minor ($MAJOR.$((MINOR + 1)))"
elif [ "${CMAKE_REQUIRED:-}" = 1 ]; then
    fail "cmake is missing (.ci/run installs it)"
else
    echo "test-install: SKIP CMake consumers (cmake is not installed)"
fi

# --- staged install -----------------------------------------------------------------------
stage=$work/stage
$MAKE --no-print-directory install DESTDIR="$stage" PREFIX=/opt/st_proactor > "$work/stage.log" 2>&1 ||
    { cat "$work/stage.log"; fail "make install DESTDIR"; }
grep -qx 'prefix=/opt/st_proactor' "$stage/opt/st_proactor/lib/pkgconfig/st_proactor.pc" ||
    fail "the staged st_proactor.pc does not name /opt/st_proactor"
grep -q "\"/opt/st_proactor/lib/libst_proactor.so.$VERSION\"" \
    "$stage/opt/st_proactor/lib/cmake/st_proactor/st_proactor-config.cmake" ||
    fail "the staged CMake package does not name /opt/st_proactor"
if grep -rq "$stage" "$stage/opt/st_proactor/lib/pkgconfig" "$stage/opt/st_proactor/lib/cmake"; then
    fail "DESTDIR leaked into the installed files"
fi
$MAKE --no-print-directory uninstall DESTDIR="$stage" PREFIX=/opt/st_proactor > "$work/stage.log" 2>&1 ||
    { cat "$work/stage.log"; fail "make uninstall DESTDIR"; }
left=$(find "$stage/opt/st_proactor" -mindepth 1)
[ -z "$left" ] || fail "make uninstall DESTDIR left:"$'\n'"$left"
ok "staged install (DESTDIR) names the final prefix, and uninstalls"

# --- the chat servers, without LD_LIBRARY_PATH ------------------------------------------------
for backend in $BACKENDS; do
    for server in ./proact_server ./c_demo/chat_server; do
        if ! ST_PROACTOR_BACKEND=$backend $PYTHON tests/install/serve_without_library_path.py \
            "$server" | sed 's/^/test-install: /'; then
            fail "$server without LD_LIBRARY_PATH ($backend)"
        fi
    done
done

# --- uninstall ------------------------------------------------------------------------------
$MAKE --no-print-directory uninstall PREFIX="$prefix" > "$work/uninstall.log" 2>&1 ||
    { cat "$work/uninstall.log"; fail "make uninstall PREFIX=$prefix"; }
left=$(find "$prefix" -mindepth 1)
[ -z "$left" ] || fail "make uninstall left:"$'\n'"$left"
if "$work/c/hello" > /dev/null 2>&1; then fail "the pkg-config program still runs: which library?"; fi
ok "make uninstall PREFIX=$prefix leaves it empty (and its programs without a library)"
