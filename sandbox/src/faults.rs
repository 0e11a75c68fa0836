//! Faults injected into IoT requests on demand, for reliability tests.

use std::sync::Mutex;

use crate::state::lock;

/// A fault the sandbox can inject into IoT requests; see
/// [`crate::Sandbox::inject_fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 400 with `ThrottlingException` ("Rate exceeded"); the request
    /// is not carried out.
    Throttling,
    /// HTTP 503 with `ServiceUnavailableException`; not carried out.
    ServiceUnavailable,
    /// HTTP 500 with `InternalFailureException`; not carried out.
    InternalFailure,
    /// The connection is closed before the request is carried out.
    DropConnection,
    /// The request is carried out, then the connection is closed without
    /// the response (the client cannot know that it succeeded).
    DropResponse,
}

/// One armed fault.
#[derive(Debug)]
struct Armed {
    /// Matches requests whose `METHOD /path` starts with this.
    prefix: String,
    fault: Fault,
    remaining: usize,
}

/// The faults waiting for matching requests.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    armed: Mutex<Vec<Armed>>,
}

impl Faults {
    pub fn arm(&self, prefix: &str, fault: Fault, times: usize) {
        if times > 0 {
            lock(&self.armed).push(Armed {
                prefix: prefix.to_owned(),
                fault,
                remaining: times,
            });
        }
    }

    /// Takes the fault for a request, if one is armed for it.
    pub fn take(&self, method: &str, path: &str) -> Option<Fault> {
        let request = format!("{method} {path}");
        let mut armed = lock(&self.armed);
        let index = armed.iter().position(|a| request.starts_with(&a.prefix))?;
        let fault = armed[index].fault;
        armed[index].remaining -= 1;
        if armed[index].remaining == 0 {
            armed.remove(index);
        }
        Some(fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_fire_the_given_number_of_times() {
        let faults = Faults::default();
        faults.arm("POST /thing-registration-tasks", Fault::Throttling, 2);
        faults.arm("", Fault::DropResponse, 1);
        assert_eq!(faults.take("GET", "/things/x"), Some(Fault::DropResponse));
        assert_eq!(faults.take("GET", "/things/x"), None);
        assert_eq!(
            faults.take("POST", "/thing-registration-tasks"),
            Some(Fault::Throttling)
        );
        assert_eq!(
            faults.take("POST", "/thing-registration-tasks"),
            Some(Fault::Throttling)
        );
        assert_eq!(faults.take("POST", "/thing-registration-tasks"), None);
    }
}
