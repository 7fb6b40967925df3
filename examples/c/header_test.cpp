// Header compile test (C++17): fleetprov.h is usable from C++ (extern "C", no C-only
// constructs) under -Wall -Wextra -pedantic -Werror. Linked against the shared library.
#include "fleetprov.h"

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

namespace {
struct config_deleter {
    void operator()(fleetprov_config *c) const noexcept { fleetprov_config_free(c); }
};
using config_ptr = std::unique_ptr<fleetprov_config, config_deleter>;
}  // namespace

static_assert(FLEETPROV_OK == 0, "FLEETPROV_OK is 0");

int main() {
    if (std::string(fleetprov_version()) != FLEETPROV_VERSION) {
        std::fprintf(stderr, "header %s, library %s\n", FLEETPROV_VERSION, fleetprov_version());
        return 1;
    }
    fleetprov_config *raw = nullptr;
    if (fleetprov_config_new(&raw) != FLEETPROV_OK) {
        return 1;
    }
    config_ptr cfg(raw);
    fleetprov_result r = fleetprov_config_set_format(cfg.get(), FLEETPROV_FORMAT_CBOR);
    fleetprov_result bad = fleetprov_config_set_format(cfg.get(), 42);
    fleetprov_error *err = fleetprov_last_error();
    bool ok = r == FLEETPROV_OK && bad == FLEETPROV_INVALID_ARGUMENT && err != nullptr &&
              fleetprov_error_result(err) == FLEETPROV_INVALID_ARGUMENT &&
              fleetprov_error_status_code(err) == 0 &&
              std::strcmp(fleetprov_error_code(err), "") == 0;
    std::printf("fleetprov %s (C++17): %s\n", fleetprov_version(),
                err ? fleetprov_error_message(err) : "(no error)");
    fleetprov_error_free(err);

    // The progress callback's signature, from a captureless lambda, and the retry, journal and
    // token settings: values the library refuses, and the NULL rules of the new getters.
    fleetprov_progress_callback on_progress = [](void *, const fleetprov_progress *p) {
        std::printf("step %d attempt %u\n", static_cast<int>(p->step), p->attempt);
    };
    ok = ok &&
         fleetprov_config_set_progress_callback(cfg.get(), on_progress, nullptr, nullptr) ==
             FLEETPROV_OK &&
         fleetprov_config_set_retry(cfg.get(), 3, 100, 1000) == FLEETPROV_OK &&
         fleetprov_config_set_retry(cfg.get(), 0, 100, 1000) == FLEETPROV_INVALID_ARGUMENT &&
         fleetprov_config_set_retry(cfg.get(), 3, 1000, 100) == FLEETPROV_INVALID_ARGUMENT &&
         fleetprov_config_set_token_lifetime(cfg.get(), 600) == FLEETPROV_OK &&
         fleetprov_config_set_state_dir(cfg.get(), nullptr) == FLEETPROV_OK &&
         fleetprov_provisioned_attempts(nullptr) == 0 && !fleetprov_provisioned_resumed(nullptr);
    if (!ok) {
        std::fprintf(stderr, "unexpected results\n");
    }
    return ok ? 0 : 1;
}
