# st_proactor: `make` builds the library, its header and the programs; `make test` runs every
# test on every backend. Cargo does the Rust work; this file only orders the steps.

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

RUST_SOURCES := $(shell find src -name '*.rs') Cargo.toml Cargo.lock build.rs cbindgen.toml
HEADER       := include/st_proactor.h
C_TEST       := tests/c/capi_test
RUST_SERVER  := proact_server
C_SERVER     := c_demo/chat_server
PYTHON       ?= python3

.PHONY: all test test-rust test-c test-valgrind test-readme test-chat check-header check-symbols \
        bench clean

all: libst_proactor.so $(RUST_SERVER) $(C_SERVER)

# build.rs regenerates the header whenever it runs; the touch keeps make's view of it current.
libst_proactor.so $(HEADER) &: $(RUST_SOURCES)
	$(CARGO) build --release --lib
	# A rename, not a copy over the old file: programs running from it keep their copy.
	cp target/release/libst_proactor.so libst_proactor.so.tmp && mv -f libst_proactor.so.tmp libst_proactor.so
	touch $(HEADER)

# The Rust chat server links libst_proactor.so dynamically through its C ABI (see build.rs).
$(RUST_SERVER): examples/proact_server.rs libst_proactor.so
	$(CARGO) build --release --example proact_server
	cp target/release/examples/proact_server $@.tmp && mv -f $@.tmp $@

$(C_SERVER): c_demo/chat_server.c c_demo/Makefile libst_proactor.so $(HEADER)
	$(MAKE) -C c_demo

$(C_TEST): tests/c/capi_test.c $(HEADER) libst_proactor.so
	$(CC) $(C_WARN) $(CFLAGS) -Iinclude -o $@ $< -L. -lst_proactor -pthread

test: all check-header check-symbols test-rust test-c test-valgrind test-readme test-chat

# The committed header must be what cbindgen makes from the sources, and must compile as
# strict C and C++.
check-header: $(HEADER)
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  git diff --exit-code --stat -- $(HEADER) || { \
	    echo "check-header: $(HEADER) differs from the committed one: commit the regenerated header"; exit 1; }; \
	else echo "check-header: SKIP freshness (not a git checkout)"; fi
	$(CC) $(C_WARN) -fsyntax-only -x c $(HEADER)
	$(CXX) $(CXX_WARN) -fsyntax-only -x c++ $(HEADER)
	@echo "check-header: ok"

# The .so carries its SONAME and exports exactly the functions the header declares: no stray
# Rust symbols a C program could bind to by accident.
check-symbols: libst_proactor.so $(HEADER)
	@mkdir -p target
	@readelf -d libst_proactor.so | grep -q 'SONAME.*\[libst_proactor.so\]' || { \
	  echo "check-symbols: libst_proactor.so lacks the SONAME libst_proactor.so"; exit 1; }
	@nm -D --defined-only libst_proactor.so | awk '{ print $$3 }' | sort > target/exported-symbols.txt
	@grep -v '^typedef' $(HEADER) | sed -n 's/^[a-z].*[ *]\([A-Za-z0-9]\{1,\}\)(.*/\1/p' | sort \
	  > target/declared-symbols.txt
	@diff -u target/declared-symbols.txt target/exported-symbols.txt || { \
	  echo "check-symbols: the exported symbols (+) differ from the header's functions (-)"; exit 1; }
	@echo "check-symbols: ok ($$(wc -l < target/exported-symbols.txt) functions, SONAME libst_proactor.so)"

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

test-valgrind: $(C_TEST)
	@if ! command -v $(VALGRIND) >/dev/null 2>&1; then \
	  if [ -n "$$CI" ]; then echo "test-valgrind: valgrind is missing"; exit 1; fi; \
	  echo "test-valgrind: SKIP (valgrind is not installed)"; exit 0; fi; \
	for backend in $(VALGRIND_BACKENDS); do \
	  echo "== C API tests under valgrind, backend $$backend"; \
	  ST_PROACTOR_BACKEND=$$backend LD_LIBRARY_PATH=. $(VALGRIND) -q --leak-check=full \
	    --errors-for-leak-kinds=definite --error-exitcode=1 ./$(C_TEST) --valgrind || exit 1; \
	done

# The C program at the top of README.md, built and run as the README says.
README_EXAMPLE := target/readme/read_stdin
test-readme: libst_proactor.so $(HEADER)
	@mkdir -p $(dir $(README_EXAMPLE))
	awk '/^```c$$/ { inside = 1; next } /^```/ { if (inside) exit } inside' README.md > $(README_EXAMPLE).c
	$(CC) -Wall -Wextra -Werror -Iinclude -o $(README_EXAMPLE) $(README_EXAMPLE).c -L. -lst_proactor
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

# Side-by-side benchmark of the chat servers and the peers (tests/bench/README.md): prints a
# table; fails only if one of our servers loses or reorders lines, never on times.
bench: all
	$(PYTHON) tests/bench/run_bench.py $(BENCH_ARGS)

clean:
	$(CARGO) clean
	$(MAKE) -C c_demo clean
	rm -f libst_proactor.so $(RUST_SERVER) $(C_TEST)
