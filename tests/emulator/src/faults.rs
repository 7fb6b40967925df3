//! Fault injection: rules that make the emulator misbehave on purpose, so clients can be tested
//! against the failures a real network and a real service produce.
//!
//! A rule is written `ACTION[@API][*COUNT]`:
//!
//! | action | effect |
//! |---|---|
//! | `delay:MS` | hold each matching reply for MS milliseconds |
//! | `reject:STATUS` | answer the request with a rejection (429 Throttling, 500 InternalError, 503 ServiceUnavailable, or any 4xx/5xx as InternalError-like) without processing it |
//! | `drop` | process the request but send no reply |
//! | `duplicate` | send the reply twice |
//! | `close:connect` | close the connection right after CONNACK |
//! | `close:suback` | close the connection right after a SUBACK |
//! | `close:request` | close the connection when a request arrives, before processing it |
//! | `close:processed` | process the request, then close before replying |
//! | `close:reply` | reply, then close the connection |
//!
//! `API` is `keys`, `csr`, `create` (either certificate API), `register` or `any` (the default).
//! For `close:suback` the API is the one whose reply topics the SUBSCRIBE names. `COUNT` makes
//! the rule fire that many times and then vanish; without it the rule stays until cleared.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use crate::topics::Api;

/// Where a `close` rule cuts the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Connect,
    Suback,
    Request,
    Processed,
    Reply,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Suback => "suback",
            Step::Request => "request",
            Step::Processed => "processed",
            Step::Reply => "reply",
        }
    }
}

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Delay(Duration),
    Reject(u16),
    Drop,
    Duplicate,
    Close(Step),
}

/// Which requests a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFilter {
    Any,
    Keys,
    Csr,
    Create,
    Register,
}

impl ApiFilter {
    fn admits(self, api: Option<&Api>) -> bool {
        match (self, api) {
            (ApiFilter::Any, _) => true,
            (_, None) => false,
            (ApiFilter::Keys, Some(Api::CreateKeysAndCertificate)) => true,
            (ApiFilter::Csr, Some(Api::CreateCertificateFromCsr)) => true,
            (ApiFilter::Create, Some(Api::CreateKeysAndCertificate))
            | (ApiFilter::Create, Some(Api::CreateCertificateFromCsr)) => true,
            (ApiFilter::Register, Some(Api::RegisterThing { .. })) => true,
            _ => false,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ApiFilter::Any => "any",
            ApiFilter::Keys => "keys",
            ApiFilter::Csr => "csr",
            ApiFilter::Create => "create",
            ApiFilter::Register => "register",
        }
    }
}

/// One fault rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub action: Action,
    pub api: ApiFilter,
    /// How many more times the rule fires; `None` for always.
    pub remaining: Option<u32>,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.action {
            Action::Delay(d) => write!(f, "delay:{}", d.as_millis())?,
            Action::Reject(s) => write!(f, "reject:{s}")?,
            Action::Drop => f.write_str("drop")?,
            Action::Duplicate => f.write_str("duplicate")?,
            Action::Close(step) => write!(f, "close:{}", step.name())?,
        }
        if self.api != ApiFilter::Any {
            write!(f, "@{}", self.api.name())?;
        }
        if let Some(n) = self.remaining {
            write!(f, "*{n}")?;
        }
        Ok(())
    }
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(text: &str) -> Result<Fault, String> {
        let text = text.trim();
        let (rest, remaining) = match text.rsplit_once('*') {
            Some((rest, n)) => {
                let n: u32 = n
                    .parse()
                    .map_err(|_| format!("bad count {n:?} in fault {text:?}"))?;
                if n == 0 {
                    return Err(format!("count must be at least 1 in fault {text:?}"));
                }
                (rest, Some(n))
            }
            None => (text, None),
        };
        let (rest, api) = match rest.split_once('@') {
            Some((rest, api)) => (
                rest,
                match api {
                    "any" => ApiFilter::Any,
                    "keys" => ApiFilter::Keys,
                    "csr" => ApiFilter::Csr,
                    "create" => ApiFilter::Create,
                    "register" => ApiFilter::Register,
                    other => return Err(format!("unknown API {other:?} in fault {text:?}")),
                },
            ),
            None => (rest, ApiFilter::Any),
        };
        let (name, arg) = match rest.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (rest, None),
        };
        let action = match (name, arg) {
            ("delay", Some(ms)) => Action::Delay(Duration::from_millis(
                ms.parse()
                    .map_err(|_| format!("bad delay {ms:?} in fault {text:?}"))?,
            )),
            ("reject", Some(status)) => {
                let s: u16 = status
                    .parse()
                    .map_err(|_| format!("bad status {status:?} in fault {text:?}"))?;
                if !(400..600).contains(&s) {
                    return Err(format!("status must be 4xx or 5xx in fault {text:?}"));
                }
                Action::Reject(s)
            }
            ("drop", None) => Action::Drop,
            ("duplicate", None) => Action::Duplicate,
            ("close", Some(step)) => Action::Close(match step {
                "connect" => Step::Connect,
                "suback" => Step::Suback,
                "request" => Step::Request,
                "processed" => Step::Processed,
                "reply" => Step::Reply,
                other => return Err(format!("unknown step {other:?} in fault {text:?}")),
            }),
            _ => return Err(format!("unknown fault {text:?}")),
        };
        Ok(Fault {
            action,
            api,
            remaining,
        })
    }
}

/// The rules in force; shared by every connection.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<Fault>>,
}

impl Faults {
    /// Adds a rule after those already there.
    pub fn add(&self, fault: Fault) {
        self.lock().push(fault);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The rules in force, in order.
    pub fn list(&self) -> Vec<Fault> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Fault>> {
        // A poisoned lock only means a panic elsewhere; the rule list itself stays consistent.
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fires the first rule whose action satisfies `want` and whose API filter admits `api`,
    /// consuming one of its counts.
    pub fn fire(&self, api: Option<&Api>, want: impl Fn(&Action) -> bool) -> Option<Action> {
        let mut rules = self.lock();
        let idx = rules
            .iter()
            .position(|r| want(&r.action) && r.api.admits(api))?;
        let action = rules[idx].action;
        if let Some(n) = rules[idx].remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                rules.remove(idx);
            }
        }
        Some(action)
    }

    /// Fires a `close` rule for `step`.
    pub fn close_at(&self, step: Step, api: Option<&Api>) -> bool {
        self.fire(api, |a| *a == Action::Close(step)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let rows: &[(&str, Result<&str, ()>)] = &[
            ("delay:1500", Ok("delay:1500")),
            ("reject:429*3", Ok("reject:429*3")),
            ("reject:500@register*1", Ok("reject:500@register*1")),
            ("drop@keys", Ok("drop@keys")),
            ("duplicate@csr*2", Ok("duplicate@csr*2")),
            ("close:connect*1", Ok("close:connect*1")),
            ("close:suback@create", Ok("close:suback@create")),
            ("close:processed@register", Ok("close:processed@register")),
            ("close:reply@any", Ok("close:reply")),
            ("reject:200", Err(())),
            ("reject", Err(())),
            ("delay:x", Err(())),
            ("close:later", Err(())),
            ("drop@nowhere", Err(())),
            ("drop*0", Err(())),
            ("drop*-1", Err(())),
            ("explode", Err(())),
            ("", Err(())),
        ];
        for (text, want) in rows {
            let got = text.parse::<Fault>().map(|f| f.to_string()).map_err(|_| ());
            assert_eq!(got, want.map(str::to_owned), "{text}");
        }
    }

    #[test]
    fn counts_are_consumed_and_filters_apply() {
        let faults = Faults::default();
        faults.add("reject:429@register*2".parse().unwrap());
        let keys = Api::CreateKeysAndCertificate;
        let reg = Api::RegisterThing {
            template: "T".into(),
        };
        let is_reject = |a: &Action| matches!(a, Action::Reject(_));
        assert_eq!(faults.fire(Some(&keys), is_reject), None);
        assert_eq!(
            faults.fire(Some(&reg), is_reject),
            Some(Action::Reject(429))
        );
        assert_eq!(
            faults.fire(Some(&reg), is_reject),
            Some(Action::Reject(429))
        );
        assert_eq!(faults.fire(Some(&reg), is_reject), None);
        assert!(faults.list().is_empty());
        faults.add("close:connect".parse().unwrap());
        assert!(faults.close_at(Step::Connect, None));
        assert!(faults.close_at(Step::Connect, None));
        faults.clear();
        assert!(!faults.close_at(Step::Connect, None));
    }
}
