# st_proactor: `make` builds the libraries and the programs and checks the header; `make header`
# regenerates the header; `make install` / `make uninstall` (PREFIX, DESTDIR, LIBDIR, INCLUDEDIR);
# `make test` checks that the tools the tests need are installed, then runs every test on every
# backend. Cargo does the Rust work; this file only orders the steps.

CARGO    ?= cargo
CC       ?= cc
CXX      ?= c++
CFLAGS   ?= -O2 -g
C_WARN   := -std=c11 -Wall -Wextra -Werror -pedantic
CXX_WARN := -std=c++17 -Wall -Wextra -Werror
VALGRIND ?= valgrind
# Backends the tests run on, one after the other.
BACKENDS ?= epoll uring
# valgrind (3.19) holds its global lock while a thread blocks in io_uring_enter, which
# freezes every other thread of the program: the memory check runs on epoll only.
VALGRIND_BACKENDS ?= epoll

RUST_SOURCES := $(shell find src -name '*.rs') Cargo.toml Cargo.lock build.rs
HEADER       := include/st_proactor.h
CXX_HEADER   := include/st_proactor.hpp
CXX_TEST     := tests/cpp/wrapper_test
C_TEST       := tests/c/capi_test
RUST_SERVER  := proact_server
C_SERVER     := c_demo/chat_server
PYTHON       ?= python3

# Cargo.toml is the one place the version is written; the SONAME carries its major number.
VERSION       := $(shell sed -n 's/^version = "\([^"]*\)"/\1/p' Cargo.toml | head -n 1)
VERSION_MAJOR := $(firstword $(subst ., ,$(VERSION)))
RUST_VERSION  := $(shell sed -n 's/^rust-version = "\([^"]*\)"/\1/p' Cargo.toml | head -n 1)
SONAME        := libst_proactor.so.$(VERSION_MAJOR)
REALNAME      := libst_proactor.so.$(VERSION)
STATIC_LIB    := target/release/libst_proactor.a

# Where `make install` puts things; DESTDIR is prepended to each for staged installs.
PREFIX       ?= /usr/local
LIBDIR       ?= $(PREFIX)/lib
INCLUDEDIR   ?= $(PREFIX)/include
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
CMAKEDIR     ?= $(LIBDIR)/cmake/st_proactor
INSTALL      ?= install
RUSTC        ?= rustc
# Exactly what `make install` installs, and `make uninstall` removes.
INSTALLED    := $(LIBDIR)/$(REALNAME) $(LIBDIR)/$(SONAME) $(LIBDIR)/libst_proactor.so \
                $(LIBDIR)/libst_proactor.a $(INCLUDEDIR)/st_proactor.h $(INCLUDEDIR)/st_proactor.hpp \
                $(PKGCONFIGDIR)/st_proactor.pc $(CMAKEDIR)/st_proactor-config.cmake \
                $(CMAKEDIR)/st_proactor-config-version.cmake

.PHONY: all test test-all check-tools lint test-rust test-c test-cpp test-valgrind test-readme test-chat \
        test-hostile test-fallbacks test-install check-header check-symbols check-doc header install \
        uninstall bench clean

all: libst_proactor.so $(RUST_SERVER) $(C_SERVER) target/native-static-libs check-header

# Builds libst_proactor.so, libst_proactor.a (left in target/release) and the rlib. The build
# tree keeps the library as ./libst_proactor.so, with the SONAME's name linked to it: programs
# linked against it ask for libst_proactor.so.$(VERSION_MAJOR).
libst_proactor.so: $(RUST_SOURCES)
	$(CARGO) build --release --lib
	# A rename, not a copy over the old file: programs running from it keep their copy.
	cp target/release/libst_proactor.so libst_proactor.so.tmp && mv -f libst_proactor.so.tmp libst_proactor.so
	ln -sf libst_proactor.so $(SONAME)

# What a program linking libst_proactor.a needs besides it (pkg-config's Libs.private), as
# rustc reports it for the standard library, less -lgcc_s: every C compiler driver links the
# unwinder itself (libgcc_s as needed, or libgcc_eh with -static, where -lgcc_s would fail).
target/native-static-libs: Cargo.lock
	@mkdir -p target/probe
	echo '' | $(RUSTC) --crate-type staticlib --crate-name probe --print native-static-libs \
	  -o target/probe/libprobe.a - 2>&1 | sed -n 's/.*native-static-libs: //p' \
	  | tr ' ' '\n' | grep -v -e '^-lgcc_s$$' -e '^$$' | tr '\n' ' ' | sed 's/ $$//' > $@.tmp
	@test -s $@.tmp || { echo "native-static-libs: rustc did not say what a static library needs"; exit 1; }
	mv -f $@.tmp $@

# The Rust chat server links libst_proactor.so dynamically through its C ABI (see build.rs).
$(RUST_SERVER): examples/proact_server.rs libst_proactor.so
	$(CARGO) build --release --example proact_server
	cp target/release/examples/proact_server $@.tmp && mv -f $@.tmp $@

$(C_SERVER): c_demo/chat_server.c c_demo/Makefile libst_proactor.so $(HEADER)
	$(MAKE) -C c_demo

$(C_TEST): tests/c/capi_test.c $(HEADER) libst_proactor.so
	$(CC) $(C_WARN) $(CFLAGS) -Iinclude -o $@ $< -L. -lst_proactor -pthread

$(CXX_TEST): tests/cpp/wrapper_test.cpp $(CXX_HEADER) $(HEADER) libst_proactor.so
	$(CXX) $(CXX_WARN) -pedantic $(CFLAGS) -Iinclude -o $@ $< -L. -lst_proactor -pthread

# The code's habits: rustfmt's layout and clippy without a warning (the C code is compiled
# with -Wall -Wextra -Werror wherever it is built).
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets --quiet -- -D warnings
	@echo "lint: ok"

# check-tools runs alone first, even under make -j: the rest is a second make that starts only
# once it has passed, so a fresh machine learns what it lacks in a second, before any build.
test: check-tools
	@$(MAKE) --no-print-directory test-all

test-all: all lint check-header check-symbols check-doc test-rust test-c test-cpp test-valgrind test-readme \
      test-chat test-hostile test-fallbacks test-install

# What the tests run besides the shell's own tools, as COMMAND=DEBIAN_PACKAGE (RUST: see below).
# .ci/run installs the same; test-valgrind, the nc test and test-install's CMake part skip a
# missing tool when run alone outside CI, but `make test` wants everything. The make running
# this is the make the tests use.
TEST_TOOLS := $(firstword $(CARGO))=RUST $(firstword $(RUSTC))=RUST $(firstword $(CC))=gcc \
              $(firstword $(CXX))=g++ $(firstword $(PYTHON))=python3 nc=netcat-openbsd \
              $(firstword $(VALGRIND))=valgrind readelf=binutils nm=binutils pkg-config=pkg-config \
              cmake=cmake
check-tools:
	@missing=; packages=; rust=; \
	for entry in $(TEST_TOOLS); do \
	  tool=$${entry%=*}; package=$${entry##*=}; \
	  command -v "$$tool" >/dev/null 2>&1 && continue; \
	  missing="$$missing $$tool"; \
	  if [ "$$package" = RUST ]; then rust=1; continue; fi; \
	  case " $$packages " in *" $$package "*) ;; *) packages="$$packages $$package" ;; esac; \
	done; \
	if command -v $(firstword $(CC)) >/dev/null 2>&1 && [ "$$($(CC) -print-file-name=libc.a)" = libc.a ]; then \
	  missing="$$missing libc.a"; packages="$$packages libc6-dev"; fi; \
	[ -z "$$missing" ] && exit 0; \
	how=; \
	[ -n "$$packages" ] && how="on Debian/Ubuntu: sudo apt-get install$$packages"; \
	[ -n "$$rust" ] && how="$${how:+$$how; }Rust $(RUST_VERSION) or newer with cargo: curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"; \
	echo "make test needs:$$missing -- $$how" >&2; exit 1

# The header is generated by an explicit step, never by the build: cbindgen reads src/capi.rs
# (tools/generate_header.rs adds the version macros from Cargo.toml).
HEADER_GENERATOR := $(CARGO) run --quiet --release --example generate_header --
header:
	$(HEADER_GENERATOR) $(HEADER)

# The committed header must be what cbindgen makes from the sources (whether or not this is a
# git checkout), and must compile as strict C and C++, as must the C++ wrapper.
check-header:
	$(HEADER_GENERATOR) target/header/st_proactor.h
	@cmp -s $(HEADER) target/header/st_proactor.h || { \
	  diff -u $(HEADER) target/header/st_proactor.h | head -n 40; \
	  echo "check-header: $(HEADER) is stale: run make header and commit it"; exit 1; }
	$(CC) $(C_WARN) -fsyntax-only -x c $(HEADER)
	$(CXX) $(CXX_WARN) -fsyntax-only -x c++ $(HEADER)
	$(CXX) $(CXX_WARN) -pedantic -fsyntax-only -x c++ -Iinclude $(CXX_HEADER)
	@echo "check-header: ok"

# The Rust API's documentation builds without a warning (its doc tests run in test-rust).
check-doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --release --no-deps --lib --quiet
	@echo "check-doc: ok"

# The .so carries its SONAME and exports exactly the functions the header declares: no stray
# Rust symbols a C program could bind to by accident.
check-symbols: libst_proactor.so $(HEADER)
	@mkdir -p target
	@readelf -d libst_proactor.so | grep -q 'SONAME.*\[$(SONAME)\]' || { \
	  echo "check-symbols: libst_proactor.so lacks the SONAME $(SONAME)"; exit 1; }
	@nm -D --defined-only libst_proactor.so | awk '{ print $$3 }' | sort > target/exported-symbols.txt
	@grep -v '^typedef' $(HEADER) | sed -n 's/^[a-z].*[ *]\([A-Za-z0-9]\{1,\}\)(.*/\1/p' | sort \
	  > target/declared-symbols.txt
	@diff -u target/declared-symbols.txt target/exported-symbols.txt || { \
	  echo "check-symbols: the exported symbols (+) differ from the header's functions (-)"; exit 1; }
	@echo "check-symbols: ok ($$(wc -l < target/exported-symbols.txt) functions, SONAME $(SONAME))"

test-rust:
	@for backend in $(BACKENDS); do \
	  echo "== cargo test, backend $$backend"; \
	  ST_PROACTOR_BACKEND=$$backend $(CARGO) test --all-targets --release || exit 1; \
	  ST_PROACTOR_BACKEND=$$backend $(CARGO) test --doc --release || exit 1; \
	done

test-c: $(C_TEST)
	@for backend in $(BACKENDS); do \
	  echo "== C API tests, backend $$backend"; \
	  ST_PROACTOR_BACKEND=$$backend LD_LIBRARY_PATH=. ./$(C_TEST) || exit 1; \
	done

test-cpp: $(CXX_TEST)
	@for backend in $(BACKENDS); do \
	  echo "== C++ wrapper tests, backend $$backend"; \
	  ST_PROACTOR_BACKEND=$$backend LD_LIBRARY_PATH=. ./$(CXX_TEST) || exit 1; \
	done

test-valgrind: $(C_TEST) $(CXX_TEST)
	@if ! command -v $(VALGRIND) >/dev/null 2>&1; then \
	  if [ -n "$$CI" ]; then echo "test-valgrind: valgrind is missing"; exit 1; fi; \
	  echo "test-valgrind: SKIP (valgrind is not installed)"; exit 0; fi; \
	for backend in $(VALGRIND_BACKENDS); do \
	  echo "== C API tests under valgrind, backend $$backend"; \
	  ST_PROACTOR_BACKEND=$$backend LD_LIBRARY_PATH=. $(VALGRIND) -q --leak-check=full \
	    --errors-for-leak-kinds=definite --error-exitcode=1 ./$(C_TEST) --valgrind || exit 1; \
	  echo "== C++ wrapper tests under valgrind, backend $$backend"; \
	  ST_PROACTOR_BACKEND=$$backend LD_LIBRARY_PATH=. $(VALGRIND) -q --leak-check=full \
	    --errors-for-leak-kinds=definite --error-exitcode=1 ./$(CXX_TEST) --valgrind || exit 1; \
	done

# The C program at the top of README.md, built and run as the README says.
README_EXAMPLE := target/readme/read_stdin
test-readme: libst_proactor.so $(HEADER)
	@mkdir -p $(dir $(README_EXAMPLE))
	awk '/^```c$$/ { inside = 1; next } /^```/ { if (inside) exit } inside' README.md > $(README_EXAMPLE).c
	$(CC) -Wall -Wextra -Werror -Iinclude -o $(README_EXAMPLE) $(README_EXAMPLE).c -L. -lst_proactor
	awk '/^```c$$/ { inside = 1; block = ""; next } \
	  /^```/ { if (inside && block ~ /acceptViaProactor\(p, listener/) { printf "%s", block; exit } inside = 0 } \
	  inside { block = block $$0 "\n" }' README.md > $(README_EXAMPLE)_echo.c
	$(CC) -std=c11 -D_DEFAULT_SOURCE -Wall -Wextra -Werror -Iinclude -o $(README_EXAMPLE)_echo \
	  $(README_EXAMPLE)_echo.c -L. -lst_proactor
	@for backend in $(BACKENDS); do \
	  out=$$(echo hello | ST_PROACTOR_BACKEND=$$backend LD_LIBRARY_PATH=. ./$(README_EXAMPLE)); \
	  if [ "$$out" = "read 6 bytes: hello" ]; then echo "test-readme: ok ($$backend)"; \
	  else echo "test-readme: README example printed '$$out'"; exit 1; fi; \
	done

# The load generator the flood tests (and the benchmark) drive the servers with.
CHAT_LOAD := target/bench/chat_load
$(CHAT_LOAD): tests/bench/chat_load.c
	@mkdir -p $(dir $@)
	$(CC) $(C_WARN) -O2 -o $@ $<

# Both chat servers, end to end over real sockets (and real nc), on every backend.
test-chat: $(RUST_SERVER) $(C_SERVER) $(CHAT_LOAD)
	@for backend in $(BACKENDS); do \
	  for server in ./$(RUST_SERVER) ./$(C_SERVER); do \
	    echo "== chat tests: $$server, backend $$backend"; \
	    ST_PROACTOR_BACKEND=$$backend $(PYTHON) tests/chat/chat_e2e.py $$server || exit 1; \
	  done; \
	done

# What hostile clients can do to both chat servers (tests/chat/hostile_e2e.py: slow readers, a
# wave of clients that never read, the connection limits, --bind, a stdout nobody reads), on
# every backend.
test-hostile: $(RUST_SERVER) $(C_SERVER)
	@for backend in $(BACKENDS); do \
	  for server in ./$(RUST_SERVER) ./$(C_SERVER); do \
	    echo "== hostile-client tests: $$server, backend $$backend"; \
	    ST_PROACTOR_BACKEND=$$backend $(PYTHON) tests/chat/hostile_e2e.py $$server || exit 1; \
	  done; \
	done

# io_uring with each operation it performs left to the loop instead, as on a kernel that
# lacks it: the operation tests, the C API tests and the proactor chat.
URING_FALLBACKS ?= receive accept send all
test-fallbacks: $(RUST_SERVER) $(C_TEST) $(CHAT_LOAD)
	@for disabled in $(URING_FALLBACKS); do \
	  echo "== io_uring without $$disabled: Rust operation tests, C API tests, proactor chat"; \
	  export ST_PROACTOR_BACKEND=uring ST_PROACTOR_URING_DISABLE=$$disabled; \
	  $(CARGO) test --release --test operations --test accept_out_of_descriptors \
	    --test flow_control --test contract || exit 1; \
	  LD_LIBRARY_PATH=. ./$(C_TEST) || exit 1; \
	  $(PYTHON) tests/chat/chat_e2e.py ./$(RUST_SERVER) || exit 1; \
	done

# Installs into a temporary prefix and builds programs against it only through pkg-config and
# CMake (C, C++, static); starts both chat servers without LD_LIBRARY_PATH; uninstalls.
test-install: all
	@CMAKE_REQUIRED=$${CI:+1} MAKE="$(MAKE)" CC="$(CC)" CXX="$(CXX)" BACKENDS="$(BACKENDS)" \
	  PYTHON="$(PYTHON)" bash tests/install/test_install.sh

# Side-by-side benchmark of the chat servers and the peers (tests/bench/README.md): prints a
# table; fails only if one of our servers loses or reorders lines, never on times.
bench: all
	$(PYTHON) tests/bench/run_bench.py $(BENCH_ARGS)

# The .pc and CMake files name the install's directories, so they are made at install time.
SIZEOF_VOID_P = $(shell echo | $(CC) -dM -E - | sed -n 's/^\#define __SIZEOF_POINTER__ //p')
SUBSTITUTE = sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@LIBDIR@|$(LIBDIR)|g' \
  -e 's|@INCLUDEDIR@|$(INCLUDEDIR)|g' -e 's|@VERSION@|$(VERSION)|g' \
  -e 's|@VERSION_MAJOR@|$(VERSION_MAJOR)|g' -e 's|@SONAME@|$(SONAME)|g' \
  -e 's|@REALNAME@|$(REALNAME)|g' -e 's|@SIZEOF_VOID_P@|$(SIZEOF_VOID_P)|g' \
  -e "s|@LIBS_PRIVATE@|$$(cat target/native-static-libs)|g" \
  -e "s|@LIBS_PRIVATE_CMAKE@|$$(sed -e 's/-l//g' -e 's/ /;/g' target/native-static-libs)|g"

# Needs only what `make` built: `sudo make install` runs no cargo.
install: libst_proactor.so target/native-static-libs
	@test -f $(STATIC_LIB) || { echo "install: $(STATIC_LIB) is missing: run make"; exit 1; }
	@mkdir -p target/install
	$(SUBSTITUTE) packaging/st_proactor.pc.in > target/install/st_proactor.pc
	$(SUBSTITUTE) packaging/st_proactor-config.cmake.in > target/install/st_proactor-config.cmake
	$(SUBSTITUTE) packaging/st_proactor-config-version.cmake.in \
	  > target/install/st_proactor-config-version.cmake
	$(INSTALL) -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(PKGCONFIGDIR) \
	  $(DESTDIR)$(CMAKEDIR)
	$(INSTALL) -m 755 libst_proactor.so $(DESTDIR)$(LIBDIR)/$(REALNAME)
	ln -sf $(REALNAME) $(DESTDIR)$(LIBDIR)/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libst_proactor.so
	$(INSTALL) -m 644 $(STATIC_LIB) $(DESTDIR)$(LIBDIR)/libst_proactor.a
	$(INSTALL) -m 644 $(HEADER) $(CXX_HEADER) $(DESTDIR)$(INCLUDEDIR)
	$(INSTALL) -m 644 target/install/st_proactor.pc $(DESTDIR)$(PKGCONFIGDIR)
	$(INSTALL) -m 644 target/install/st_proactor-config.cmake \
	  target/install/st_proactor-config-version.cmake $(DESTDIR)$(CMAKEDIR)

# Removes what install installed (same variables), then the directories it leaves empty.
uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))
	@for dir in $(CMAKEDIR) $(dir $(CMAKEDIR)) $(PKGCONFIGDIR) $(LIBDIR) $(INCLUDEDIR); do \
	  rmdir "$(DESTDIR)$$dir" 2>/dev/null || true; \
	done

clean:
	$(CARGO) clean
	$(MAKE) -C c_demo clean
	rm -f libst_proactor.so $(SONAME) $(RUST_SERVER) $(C_TEST) $(CXX_TEST)
