/* Header compile test (C11): fleetprov.h compiles cleanly under -std=c11 -Wall -Wextra
 * -pedantic -Werror, and a couple of symbols link and agree with the header. Linked against
 * the static archive (fleetprov::fleetprov_static) to check its link dependencies too. */
#include "fleetprov.h"

#include <stdio.h>
#include <string.h>

_Static_assert(FLEETPROV_OK == 0, "FLEETPROV_OK is 0");
_Static_assert(FLEETPROV_VERSION_MAJOR >= 0, "version macros are integers");

/* The progress callback's signature. */
static void on_progress(void *userdata, const fleetprov_progress *progress) {
    (void)userdata;
    printf("step %d attempt %u\n", (int)progress->step, (unsigned)progress->attempt);
}

int main(void) {
    if (strcmp(fleetprov_version(), FLEETPROV_VERSION) != 0) {
        fprintf(stderr, "header %s, library %s\n", FLEETPROV_VERSION, fleetprov_version());
        return 1;
    }
    if (strcmp(fleetprov_result_name(FLEETPROV_REJECTED), "FLEETPROV_REJECTED") != 0 ||
        strcmp(fleetprov_result_name(9999), "FLEETPROV_UNKNOWN") != 0) {
        fprintf(stderr, "fleetprov_result_name disagrees with the header\n");
        return 1;
    }
    fleetprov_config *cfg = NULL;
    if (fleetprov_config_new(&cfg) != FLEETPROV_OK || cfg == NULL) {
        return 1;
    }
    /* A bad template name is refused at once, with a message. */
    fleetprov_result r = fleetprov_config_set_template(cfg, "not a valid name!");
    char msg[256];
    size_t needed = 0;
    fleetprov_result m = fleetprov_last_error_message(msg, sizeof msg, &needed);
    /* The retry, journal and token settings: values the library refuses, and NULL getters. */
    int settings_ok =
        fleetprov_config_set_progress_callback(cfg, on_progress, NULL, NULL) == FLEETPROV_OK &&
        fleetprov_config_set_retry(cfg, 3, 100, 1000) == FLEETPROV_OK &&
        fleetprov_config_set_retry(cfg, 0, 100, 1000) == FLEETPROV_INVALID_ARGUMENT &&
        fleetprov_config_set_retry(cfg, 3, 1000, 100) == FLEETPROV_INVALID_ARGUMENT &&
        fleetprov_config_set_token_lifetime(cfg, 600) == FLEETPROV_OK &&
        fleetprov_config_set_state_dir(cfg, NULL) == FLEETPROV_OK &&
        fleetprov_provisioned_attempts(NULL) == 0 && !fleetprov_provisioned_resumed(NULL);
    fleetprov_config_free(cfg);
    fleetprov_config_free(NULL);
    if (r != FLEETPROV_INVALID_ARGUMENT || m != FLEETPROV_OK || needed == 0 || msg[0] == '\0') {
        fprintf(stderr, "expected FLEETPROV_INVALID_ARGUMENT with a message, got %s\n",
                fleetprov_result_name(r));
        return 1;
    }
    if (!settings_ok) {
        fprintf(stderr, "retry, state directory or token lifetime settings misbehave\n");
        return 1;
    }
    printf("fleetprov %s (C11): %s\n", fleetprov_version(), msg);
    return 0;
}
