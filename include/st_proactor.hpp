/*
 * st_proactor.hpp: the C++17 face of st_proactor (libst_proactor.so), header only.
 *
 * st::Proactor owns one proactor of the C API (include/st_proactor.h) and destroys it when it
 * goes out of scope. Handlers are any callables (lambdas with captures, move-only ones
 * included); the wrapper keeps each one alive while the library may call it. Errors are
 * thrown as std::system_error whose code() is the errno of the C call (std::generic_category,
 * so e.code() == std::errc::file_exists works), and whose what() names that call.
 *
 * Conventions for every member below, unless its comment says otherwise:
 * - It may be called from any thread, including from inside a handler, as the C function it
 *   wraps. Handlers run on the proactor's loop thread, one at a time, with no lock held.
 * - A handler must not throw: an exception that leaves a handler calls std::terminate (it
 *   cannot unwind through the library's loop thread).
 * - A moved-from Proactor holds no proactor: its members throw EINVAL.
 * - Do not destroy (or assign over) a Proactor from inside one of its own handlers.
 *
 * Build: c++ -std=c++17 prog.cpp $(pkg-config --cflags --libs st_proactor). MIT licensed.
 */

#ifndef ST_PROACTOR_HPP
#define ST_PROACTOR_HPP

#include "st_proactor.h"

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

namespace st {

/** The version of the library the program runs with, "MAJOR.MINOR.PATCH" (never NULL); the
 *  header's is ST_PROACTOR_VERSION_STRING. Never throws; any thread. */
inline const char *version() noexcept { return getProactorVersion(); }

namespace detail {

/** One registered callable. The table below owns it; a call in progress holds a second
 *  reference, so a handler that removes its own fd finishes with its captures intact. */
struct Slot : std::enable_shared_from_this<Slot> {
    virtual ~Slot() = default;
};

template <class F>
struct Holder final : Slot {
    explicit Holder(F &&function) : call(std::move(function)) {}
    F call;
};

/** What a st::Proactor owns: the C handle, and the callables the library may call. */
struct State {
    void *handle = nullptr;
    std::mutex lock;
    std::map<int, std::shared_ptr<Slot>> slots;
    /* Every flow handler ever set, the current one last. The C API lets a delivery that has
     * begun still use a handler just replaced, so none is released before the proactor. */
    std::vector<std::shared_ptr<Slot>> flow_handlers;

    State() = default;
    State(const State &) = delete;
    State &operator=(const State &) = delete;
    /* destroyProactor joins the loop and forgets every registration: after it no handler
     * runs, so the callables (destroyed with `slots`, after this body) may go. */
    ~State() {
        if (handle != nullptr) {
            destroyProactor(handle);
        }
    }

    /* Registers `slot` for `fd` with `start` (a C call that returns 0 or -1 with errno).
     * The table owns the slot before the library may call it; a slot it replaces belongs to
     * a request that has ended (or, when `start` fails, is put back). Slots are released
     * outside the lock: destroying a callable runs the destructors of its captures, which
     * may call back into the wrapper. */
    template <class Start>
    void install(int fd, const std::shared_ptr<Slot> &slot, Start start, const char *call);

    /* Drops the callable of `fd` if it is still `slot` (a new registration of the same fd
     * number may have replaced it). */
    void forget(int fd, const Slot *slot) {
        std::shared_ptr<Slot> gone;
        {
            std::lock_guard<std::mutex> guard(lock);
            auto found = slots.find(fd);
            if (found != slots.end() && (slot == nullptr || found->second.get() == slot)) {
                gone = std::move(found->second);
                slots.erase(found);
            }
        }
    }
};

[[noreturn]] inline void fail(int error, const char *call) {
    throw std::system_error(error, std::generic_category(), call);
}

inline void check(int status, const char *call) {
    if (status != 0) {
        fail(errno, call);
    }
}

template <class Start>
void State::install(int fd, const std::shared_ptr<Slot> &slot, Start start, const char *call) {
    std::shared_ptr<Slot> previous;
    {
        std::lock_guard<std::mutex> guard(lock);
        previous = std::exchange(slots[fd], slot);
    }
    if (start() != 0) {
        int error = errno;
        {
            std::lock_guard<std::mutex> guard(lock);
            auto found = slots.find(fd);
            if (found != slots.end() && found->second == slot) {
                if (previous) {
                    found->second = std::move(previous);
                } else {
                    slots.erase(found);
                }
            }
        }
        fail(error, call);
    }
}

/* The functions the library calls. noexcept: an exception cannot cross the C boundary, so
 * one that leaves a handler terminates the program, as it would leave a std::thread. */
template <class F>
void on_ready(void *, int fd, void *context) noexcept {
    auto *holder = static_cast<Holder<F> *>(context);
    std::shared_ptr<Slot> in_call = holder->shared_from_this();
    holder->call(fd);
}

template <class F>
void on_accept(void *, int, int fd, const struct sockaddr *peer, socklen_t peer_len,
               void *context) noexcept {
    auto *holder = static_cast<Holder<F> *>(context);
    std::shared_ptr<Slot> in_call = holder->shared_from_this();
    holder->call(fd, peer, peer_len);
}

template <class F>
void on_flow(void *, int fd, int event, std::size_t queued, void *context) noexcept {
    static_cast<Holder<F> *>(context)->call(fd, event, queued);
}

template <class F>
struct Receiving {
    F call;
    State *state;
};

template <class F>
void on_receive(void *, int fd, ssize_t result, const void *data, void *context) noexcept {
    auto *holder = static_cast<Holder<Receiving<F>> *>(context);
    std::shared_ptr<Slot> in_call = holder->shared_from_this();
    std::string_view bytes;
    if (result > 0) {
        bytes = std::string_view(static_cast<const char *>(data), static_cast<std::size_t>(result));
    }
    holder->call.call(result, bytes);
    if (result <= 0) {
        holder->call.state->forget(fd, holder); /* the request's last call */
    }
}

}  // namespace detail

/**
 * An event loop on a thread of its own (see st_proactor.h for the whole contract). Move-only;
 * its destructor cancels the loop if it runs, waits for it, forgets every registration and
 * frees the proactor (destroyProactor). It never closes a registered fd.
 */
class Proactor {
public:
    /** Creates a proactor, not yet running, with the backend ST_PROACTOR_BACKEND names.
     *  Throws std::system_error: EINVAL for an unknown backend name, the kernel's error
     *  (ENOSYS, EPERM) for `uring` where io_uring is forbidden, EMFILE/ENOMEM... */
    Proactor() : state_(new detail::State) {
        state_->handle = createProactor();
        if (state_->handle == nullptr) {
            detail::fail(errno, "createProactor");
        }
    }

    Proactor(Proactor &&) noexcept = default;
    /** Destroys the proactor this one held (as the destructor does), then takes `other`'s. */
    Proactor &operator=(Proactor &&) noexcept = default;
    Proactor(const Proactor &) = delete;
    Proactor &operator=(const Proactor &) = delete;
    ~Proactor() = default;

    /** Calls `handler(fd)` on the loop thread whenever `fd` is readable, has hung up or is in
     *  error (level-triggered). The handler is kept until `fd` is removed. Throws
     *  std::system_error: EEXIST when `fd` is registered, EBADF when it is not open, EPERM
     *  when it cannot be watched (a regular file), EINVAL for a negative fd. */
    template <class F>
    void add(int fd, F &&handler) {
        using Function = std::decay_t<F>;
        static_assert(std::is_invocable_v<Function &, int>, "a handler is called as handler(fd)");
        auto slot = std::make_shared<detail::Holder<Function>>(Function(std::forward<F>(handler)));
        state().install(fd, slot, [&] {
            return addFD2ProactorWithContext(handle(), fd, &detail::on_ready<Function>, slot.get());
        }, "addFD2ProactorWithContext");
    }

    /** Ends the registration of `fd` (any kind: add, accept, receive) and releases its
     *  handler; once it returns no new call starts, and from another thread it waits for a
     *  running call to return (from inside a handler it returns at once; a handler that
     *  removes its own fd finishes normally). Never closes `fd`. Throws std::system_error:
     *  ENOENT when `fd` is not registered (a receive that has ended by itself is not). */
    void remove(int fd) {
        detail::check(removeHandler(handle(), fd), "removeHandler");
        state().forget(fd, nullptr);
    }

    /** Starts the loop on its own thread and returns at once. Throws std::system_error:
     *  EALREADY when it runs already (or from one of its handlers), EAGAIN. */
    void run() { detail::check(runProactor(handle()), "runProactor"); }

    /** Stops the loop; from another thread, waits until it has stopped. From a handler, the
     *  loop stops once that handler returns. Registrations are kept: run() starts it again.
     *  Throws std::system_error: ESRCH when the loop is not running. */
    void cancel() { detail::check(cancelProactor(handle()), "cancelProactor"); }

    /** Asks the loop to stop and returns at once. Async-signal-safe (call it from a SIGINT
     *  handler on a Proactor that outlives the handler); no effect when the loop is not
     *  running or the Proactor was moved from. Never throws. */
    void request_cancel() noexcept { requestCancelProactor(handle()); }

    /** Blocks until the loop has stopped (after a cancel from a handler, or request_cancel).
     *  Not from one of its handlers: that throws std::system_error with EDEADLK. */
    void wait() { detail::check(waitProactor(handle()), "waitProactor"); }

    /** The backend in use: "epoll" or "io_uring". Throws std::system_error (EINVAL) only for
     *  a moved-from Proactor. */
    const char *backend() const {
        const char *name = getProactorBackend(handle());
        if (name == nullptr) {
            detail::fail(errno, "getProactorBackend");
        }
        return name;
    }

    /** Hands a copy of `len` bytes to the loop, which writes them to the registered stream
     *  socket `fd` in order and without blocking. Throws std::system_error: ENOENT (not
     *  registered), ENOTSOCK/EPROTOTYPE (not a stream socket), ENOBUFS (past the send limit:
     *  nothing was queued), EPIPE/ECONNRESET (an earlier write failed)... */
    void send(int fd, const void *data, std::size_t len) {
        detail::check(sendViaProactor(handle(), fd, data, len), "sendViaProactor");
    }

    /** send(fd, bytes.data(), bytes.size()). */
    void send(int fd, std::string_view bytes) { send(fd, bytes.data(), bytes.size()); }

    /** Hands the same bytes to the loop for every fd of `fds`, with one shared copy (a chat
     *  broadcast). Returns one errno per fd, in order: 0 when that fd got the bytes, else the
     *  error send() would have thrown for it (ENOBUFS for a slow reader...). Throws
     *  std::system_error (EINVAL) only when nothing could be tried (a moved-from Proactor). */
    std::vector<int> broadcast(const std::vector<int> &fds, std::string_view bytes) {
        std::vector<int> results(fds.size(), -1); /* -1: not written by the library */
        if (broadcastViaProactor(handle(), fds.data(), fds.size(), bytes.data(), bytes.size(),
                                 results.data()) != 0 &&
            (results.empty() || results.front() == -1)) {
            detail::fail(errno, "broadcastViaProactor");
        }
        return results;
    }

    /** Sets the per-fd send limit in bytes (default 4 MiB; see setProactorSendLimit). */
    void set_send_limit(std::size_t bytes) {
        detail::check(setProactorSendLimit(handle(), bytes), "setProactorSendLimit");
    }

    /** The per-fd send limit in bytes. Throws std::system_error (EINVAL) only for a
     *  moved-from Proactor. */
    std::size_t send_limit() const {
        if (handle() == nullptr) {
            detail::fail(EINVAL, "getProactorSendLimit");
        }
        return getProactorSendLimit(handle());
    }

    /** How many bytes are queued for `fd`, counted as the send limit counts them. Throws
     *  std::system_error: ENOENT when `fd` is not registered. */
    std::size_t queued_bytes(int fd) const {
        std::size_t bytes = 0;
        detail::check(getProactorQueuedBytes(handle(), fd, &bytes), "getProactorQueuedBytes");
        return bytes;
    }

    /** Accepts connections on the listening socket `listen_fd` until it is removed: calls
     *  `on_accept(fd, peer, peer_len)` on the loop thread for each, with the new socket
     *  (non-blocking, close-on-exec, the program's to close) and the peer's address, or with
     *  fd = -errno (-EMFILE...; then peer is NULL). Throws std::system_error as add(), and
     *  EINVAL when `listen_fd` is not listening, ENOTSOCK when it is not a socket. */
    template <class F>
    void accept(int listen_fd, F &&on_accept) {
        using Function = std::decay_t<F>;
        static_assert(std::is_invocable_v<Function &, int, const struct sockaddr *, socklen_t>,
                      "an accept handler is called as on_accept(fd, peer, peer_len)");
        auto slot =
            std::make_shared<detail::Holder<Function>>(Function(std::forward<F>(on_accept)));
        state().install(listen_fd, slot, [&] {
            return acceptViaProactor(handle(), listen_fd, &detail::on_accept<Function>, slot.get());
        }, "acceptViaProactor");
    }

    /** Receives on the connected stream socket `fd`: calls `on_receive(n, bytes)` on the loop
     *  thread with what arrived (n > 0; `bytes` is valid during the call only), then once
     *  with n = 0 (the peer closed its side) or n = -errno: that last call comes after `fd`
     *  was removed (the handler may close it), and the handler is released after it. Throws
     *  std::system_error as add(), and ENOTSOCK/EPROTOTYPE when `fd` is not a stream socket. */
    template <class F>
    void receive(int fd, F &&on_receive) {
        using Function = std::decay_t<F>;
        static_assert(std::is_invocable_v<Function &, ssize_t, std::string_view>,
                      "a receive handler is called as on_receive(n, bytes)");
        using Request = detail::Receiving<Function>;
        auto slot = std::make_shared<detail::Holder<Request>>(
            Request{Function(std::forward<F>(on_receive)), state_.get()});
        state().install(fd, slot, [&] {
            return receiveViaProactor(handle(), fd, &detail::on_receive<Function>, slot.get());
        }, "receiveViaProactor");
    }

    /** Pauses the reading of `fd`: no new call of its handler (or completion) starts until
     *  resume_reading(fd); its bytes wait in the socket, and its queued output is still
     *  written. Throws std::system_error: ENOENT when `fd` is not registered. */
    void pause_reading(int fd) {
        detail::check(pauseProactorReading(handle(), fd), "pauseProactorReading");
    }

    /** Resumes the reading of `fd` paused by pause_reading. Throws std::system_error: ENOENT
     *  when `fd` is not registered. */
    void resume_reading(int fd) {
        detail::check(resumeProactorReading(handle(), fd), "resumeProactorReading");
    }

    /** Sets the watermarks of every fd's queued output, in bytes (defaults 256 KiB and
     *  1 MiB): the flow handler hears when a queue rises above `high` and when it falls back
     *  to `low`. Throws std::system_error: EINVAL when `low` is above `high`. */
    void set_watermarks(std::size_t low, std::size_t high) {
        detail::check(setProactorWatermarks(handle(), low, high), "setProactorWatermarks");
    }

    /** The watermarks, {low, high}. Throws std::system_error (EINVAL) only for a moved-from
     *  Proactor. */
    std::pair<std::size_t, std::size_t> watermarks() const {
        std::size_t low = 0, high = 0;
        detail::check(getProactorWatermarks(handle(), &low, &high), "getProactorWatermarks");
        return {low, high};
    }

    /** After `timeout` with no progress of an fd's waiting output, the flow handler gets
     *  ST_PROACTOR_FLOW_STALLED for it; zero turns stall detection off (the default). Throws
     *  std::system_error: EINVAL for a negative timeout or one past UINT_MAX ms. */
    void set_stall_timeout(std::chrono::milliseconds timeout) {
        if (timeout.count() < 0 || timeout.count() > static_cast<long long>(UINT_MAX)) {
            detail::fail(EINVAL, "setProactorStallTimeout");
        }
        detail::check(setProactorStallTimeout(handle(), static_cast<unsigned>(timeout.count())),
                      "setProactorStallTimeout");
    }

    /** After `timeout` of one congestion of an fd's output (from its ST_PROACTOR_FLOW_HIGH,
     *  without its ST_PROACTOR_FLOW_DRAINED), progress or not, the flow handler gets
     *  ST_PROACTOR_FLOW_LAGGING for it, once per congestion; zero turns lag detection off (the
     *  default). Throws std::system_error: EINVAL for a negative timeout or one past UINT_MAX
     *  ms. */
    void set_lag_timeout(std::chrono::milliseconds timeout) {
        if (timeout.count() < 0 || timeout.count() > static_cast<long long>(UINT_MAX)) {
            detail::fail(EINVAL, "setProactorLagTimeout");
        }
        detail::check(setProactorLagTimeout(handle(), static_cast<unsigned>(timeout.count())),
                      "setProactorLagTimeout");
    }

    /** Calls `on_flow(fd, event, queued)` on the loop thread for each flow event of an fd's
     *  queued output: ST_PROACTOR_FLOW_HIGH, ST_PROACTOR_FLOW_DRAINED,
     *  ST_PROACTOR_FLOW_STALLED or ST_PROACTOR_FLOW_LAGGING, with the queued bytes at that moment. It replaces the
     *  previous flow handler, which is kept (not destroyed) until the Proactor is: a delivery
     *  already begun may still call it. Throws std::system_error (EINVAL) only for a
     *  moved-from Proactor. */
    template <class F>
    void set_flow_handler(F &&on_flow) {
        using Function = std::decay_t<F>;
        static_assert(std::is_invocable_v<Function &, int, int, std::size_t>,
                      "a flow handler is called as on_flow(fd, event, queued)");
        auto slot = std::make_shared<detail::Holder<Function>>(Function(std::forward<F>(on_flow)));
        detail::State &table = state();
        {
            std::lock_guard<std::mutex> guard(table.lock);
            table.flow_handlers.push_back(slot);
        }
        detail::check(setProactorFlowHandler(handle(), &detail::on_flow<Function>, slot.get()),
                      "setProactorFlowHandler");
    }

    /** Removes the flow handler: flow events are dropped from then on. */
    void clear_flow_handler() {
        detail::check(setProactorFlowHandler(handle(), nullptr, nullptr), "setProactorFlowHandler");
    }

    /** The C handle (void *) for the functions of st_proactor.h; NULL when moved from. The
     *  Proactor still owns it. */
    void *native_handle() const noexcept { return handle(); }

private:
    void *handle() const noexcept { return state_ ? state_->handle : nullptr; }

    /* The table of a Proactor that holds one; EINVAL for a moved-from one. */
    detail::State &state() const {
        if (!state_) {
            detail::fail(EINVAL, "st::Proactor (moved from)");
        }
        return *state_;
    }

    std::unique_ptr<detail::State> state_;
};

}  // namespace st

#endif /* ST_PROACTOR_HPP */
