//! Crash points for the crash tests.
//!
//! `PROVLINE_FAILPOINT=<name>[:<n>]` aborts the process, with no cleanup, the
//! n-th time (default: the first) execution reaches the point of that name.
//! An abort is as abrupt as SIGKILL: nothing is flushed, no destructor runs.
//! Production runs never set the variable; then each point is one relaxed
//! check of a value read once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The points, in pipeline order.
pub const POINTS: [&str; 13] = [
    "keygen",       // keys made, not yet persisted
    "persist",      // keys persisted, ledger not yet told
    "stage",        // registration file written, not uploaded
    "upload",       // uploaded, ledger not yet told
    "before-start", // about to call StartThingRegistrationTask
    "after-start",  // the task started, its id not yet stored
    "polling",      // while following the task
    "task-end",     // the task ended, the ledger not yet told
    "reports",      // reports downloaded, ledger not yet told
    "reconciled",   // outcomes recorded, attempt not yet closed
    "bundle",       // after one bundle was written
    "bundled",      // bundles written, ledger not yet told
    "report",       // before results.csv, manifest and report.json
];

struct Armed {
    name: String,
    nth: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("PROVLINE_FAILPOINT").ok()?;
            let (name, nth) = match spec.split_once(':') {
                Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some(Armed {
                name,
                nth: nth.max(1),
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Aborts here if this point is armed and its turn has come.
pub fn hit(name: &str) {
    if let Some(a) = armed() {
        if a.name == name && a.seen.fetch_add(1, Ordering::Relaxed) + 1 == a.nth {
            eprintln!("provline: failpoint `{name}` reached: aborting");
            std::process::abort();
        }
    }
}
