//! Pre-provisioning hooks: a command that receives AWS's hook input JSON on stdin and prints
//! AWS's hook output JSON (`{"allowProvisioning": bool, "parameterOverrides": {...}}`).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// The hook's verdict.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow(BTreeMap<String, String>),
    /// Denied, crashed, timed out or answered nonsense; the text says which (no secrets in it).
    Deny(String),
}

/// Runs `command` with `input` on stdin; it has `limit` to answer.
pub async fn run(command: &[String], input: &Value, limit: Duration) -> Verdict {
    let Some((program, args)) = command.split_first() else {
        return Verdict::Deny("the hook has no command".into());
    };
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Verdict::Deny(format!("the hook could not start: {e}")),
    };
    let body = input.to_string();
    let outcome = tokio::time::timeout(limit, async move {
        if let Some(mut stdin) = child.stdin.take() {
            // A hook that exits without reading its input is judged by its output alone.
            let _ = stdin.write_all(body.as_bytes()).await;
            drop(stdin);
        }
        child.wait_with_output().await
    })
    .await;
    let output = match outcome {
        Err(_) => return Verdict::Deny(format!("the hook did not answer within {limit:?}")),
        Ok(Err(e)) => return Verdict::Deny(format!("the hook failed: {e}")),
        Ok(Ok(o)) => o,
    };
    if !output.status.success() {
        return Verdict::Deny(format!("the hook exited with {}", output.status));
    }
    let Ok(answer) = serde_json::from_slice::<Value>(&output.stdout) else {
        return Verdict::Deny("the hook's output is not JSON".into());
    };
    match answer.get("allowProvisioning") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => return Verdict::Deny("the hook denied provisioning".into()),
        _ => return Verdict::Deny("the hook's output has no boolean allowProvisioning".into()),
    }
    let mut overrides = BTreeMap::new();
    match answer.get("parameterOverrides") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                match v {
                    Value::String(s) => {
                        overrides.insert(k.clone(), s.clone());
                    }
                    _ => {
                        return Verdict::Deny(format!(
                            "the hook's parameterOverrides.{k} is not a string"
                        ));
                    }
                }
            }
        }
        Some(_) => return Verdict::Deny("the hook's parameterOverrides is not an object".into()),
    }
    Verdict::Allow(overrides)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[tokio::test]
    async fn verdicts() {
        let input = serde_json::json!({"parameters": {"SerialNumber": "A"}});
        let limit = Duration::from_secs(5);
        let allow = run(
            &sh(r#"cat >/dev/null; echo '{"allowProvisioning": true, "parameterOverrides": {"Location": "dock"}}'"#),
            &input,
            limit,
        )
        .await;
        assert_eq!(
            allow,
            Verdict::Allow([("Location".to_string(), "dock".to_string())].into())
        );
        // The hook sees the input on stdin.
        let echo = run(
            &sh(r#"grep -q '"SerialNumber":"A"' && echo '{"allowProvisioning": true}'"#),
            &input,
            limit,
        )
        .await;
        assert_eq!(echo, Verdict::Allow(BTreeMap::new()));
        let denied: &[Vec<String>] = &[
            sh(r#"echo '{"allowProvisioning": false}'"#),
            sh("exit 3"),
            sh("kill -9 $$"),
            sh("echo not json"),
            sh(r#"echo '{"allowProvisioning": "yes"}'"#),
            sh(r#"echo '{"allowProvisioning": true, "parameterOverrides": {"a": 1}}'"#),
            vec!["/nonexistent/hook".into()],
            vec![],
        ];
        for cmd in denied {
            assert!(
                matches!(run(cmd, &input, limit).await, Verdict::Deny(_)),
                "{cmd:?}"
            );
        }
    }

    #[tokio::test]
    async fn slow_hook_is_cut_off() {
        let started = std::time::Instant::now();
        let v = run(
            &sh("sleep 30"),
            &serde_json::json!({}),
            Duration::from_millis(300),
        )
        .await;
        assert!(
            matches!(v, Verdict::Deny(ref m) if m.contains("did not answer")),
            "{v:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
