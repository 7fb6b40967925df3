//! The registry: certificates, ownership tokens, things and policies, in SQLite.
//!
//! SQLite in WAL mode makes every change one atomic transaction, so the registry survives
//! `kill -9` at any moment. Ownership tokens are stored only as SHA-256 hashes.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

use crate::template::{CertStatus, Override, PolicySpec, TemplateOutcome};

/// Certificate status, as AWS names it.
pub const ACTIVE: &str = "ACTIVE";
pub const INACTIVE: &str = "INACTIVE";
pub const PENDING: &str = "PENDING_ACTIVATION";

/// A store failure: the SQLite error text.
#[derive(Debug)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "registry: {}", self.0)
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// A thing attached to a certificate: its type and attributes.
pub type AttachedThing = (Option<String>, std::collections::BTreeMap<String, String>);

/// Why a RegisterThing could not be committed.
#[derive(Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// The token is unknown, already used, or expired.
    BadToken,
    /// The thing exists and the template's OverrideSettings say FAIL for a change.
    Conflict(String),
    Store(String),
}

impl From<rusqlite::Error> for RegisterError {
    fn from(e: rusqlite::Error) -> Self {
        RegisterError::Store(e.to_string())
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS certificates (
    id TEXT PRIMARY KEY,
    pem TEXT NOT NULL,
    status TEXT NOT NULL,
    origin TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash TEXT PRIMARY KEY,
    certificate_id TEXT NOT NULL REFERENCES certificates(id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tokens_by_expiry ON tokens(expires_at);
CREATE TABLE IF NOT EXISTS things (
    name TEXT PRIMARY KEY,
    attributes TEXT NOT NULL,
    thing_type TEXT,
    groups TEXT NOT NULL,
    billing_group TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS thing_principals (
    thing TEXT NOT NULL REFERENCES things(name) ON DELETE CASCADE,
    certificate_id TEXT NOT NULL REFERENCES certificates(id) ON DELETE CASCADE,
    PRIMARY KEY (thing, certificate_id)
);
CREATE TABLE IF NOT EXISTS policies (
    name TEXT PRIMARY KEY,
    document TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_principals (
    policy TEXT NOT NULL REFERENCES policies(name) ON DELETE CASCADE,
    certificate_id TEXT NOT NULL REFERENCES certificates(id) ON DELETE CASCADE,
    PRIMARY KEY (policy, certificate_id)
);
";

/// The registry database.
pub struct Store {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Store {
    /// Opens (creating if needed) the registry at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// Opens an existing registry for reading only (the `list` command; safe while the emulator runs).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a certificate with `status` if it is not there yet (the claim certificate).
    pub fn ensure_certificate(
        &self,
        id: &str,
        pem: &str,
        status: &str,
        origin: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.lock().execute(
            "INSERT OR IGNORE INTO certificates (id, pem, status, origin, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, pem, status, origin, now],
        )?;
        Ok(())
    }

    /// Records a new PENDING_ACTIVATION certificate and its ownership token, in one transaction.
    pub fn insert_pending(
        &self,
        id: &str,
        pem: &str,
        origin: &str,
        token: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO certificates (id, pem, status, origin, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, pem, PENDING, origin, now],
        )?;
        tx.execute(
            "INSERT INTO tokens (token_hash, certificate_id, expires_at) VALUES (?1, ?2, ?3)",
            params![sha256_hex(token.as_bytes()), id, expires_at],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Status of a certificate, if the registry holds it.
    pub fn certificate_status(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .lock()
            .query_row("SELECT status FROM certificates WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Where a certificate came from: `claim` for the claim certificate, else the API that
    /// made it.
    pub fn certificate_origin(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .lock()
            .query_row("SELECT origin FROM certificates WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// The policies attached to a certificate: `(name, document)`, by name.
    pub fn attached_policies(&self, id: &str) -> Result<Vec<(String, String)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT p.name, p.document FROM policy_principals pp JOIN policies p ON p.name = pp.policy
             WHERE pp.certificate_id = ?1 ORDER BY p.name",
        )?;
        let rows = stmt
            .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The thing `name` if the certificate `id` is attached to it: `(thing type, attributes)`.
    pub fn attached_thing(
        &self,
        id: &str,
        name: &str,
    ) -> Result<Option<AttachedThing>, StoreError> {
        let row: Option<(Option<String>, String)> = self
            .lock()
            .query_row(
                "SELECT t.thing_type, t.attributes FROM things t
                 JOIN thing_principals tp ON tp.thing = t.name
                 WHERE t.name = ?1 AND tp.certificate_id = ?2",
                params![name, id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.map(|(ttype, attrs)| {
            let attrs: serde_json::Map<String, Value> =
                serde_json::from_str(&attrs).unwrap_or_default();
            let attrs = attrs
                .into_iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_owned())))
                .collect();
            (ttype, attrs)
        }))
    }

    /// The certificate a still-valid token is bound to: `(id, pem)`.
    pub fn token_certificate(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Option<(String, String)>, StoreError> {
        Ok(self
            .lock()
            .query_row(
                "SELECT c.id, c.pem FROM tokens t JOIN certificates c ON c.id = t.certificate_id
                 WHERE t.token_hash = ?1 AND t.expires_at > ?2 AND c.status = ?3",
                params![sha256_hex(token.as_bytes()), now, PENDING],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Applies a RegisterThing outcome in one transaction: consumes the token (single use),
    /// creates or updates the thing, sets the certificate's status and attaches thing and policies.
    pub fn register(
        &self,
        token: &str,
        certificate_id: &str,
        outcome: &TemplateOutcome,
        now: i64,
    ) -> Result<(), RegisterError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let consumed = tx.execute(
            "DELETE FROM tokens WHERE token_hash = ?1 AND certificate_id = ?2 AND expires_at > ?3",
            params![sha256_hex(token.as_bytes()), certificate_id, now],
        )?;
        if consumed != 1 {
            return Err(RegisterError::BadToken);
        }
        if let Some(thing) = &outcome.thing {
            let existing: Option<(String, Option<String>, String)> = tx
                .query_row(
                    "SELECT attributes, thing_type, groups FROM things WHERE name = ?1",
                    [&thing.name],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let new_attrs = serde_json::to_value(&thing.attributes).unwrap_or(Value::Null);
            let new_groups = json!(thing.groups);
            match existing {
                None => {
                    tx.execute(
                        "INSERT INTO things (name, attributes, thing_type, groups, billing_group, created_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![
                            thing.name,
                            new_attrs.to_string(),
                            thing.thing_type,
                            new_groups.to_string(),
                            thing.billing_group,
                            now
                        ],
                    )?;
                }
                Some((attrs, ttype, groups)) => {
                    let old_attrs: serde_json::Map<String, Value> =
                        serde_json::from_str(&attrs).unwrap_or_default();
                    let old_groups: Vec<String> = serde_json::from_str(&groups).unwrap_or_default();
                    let attrs = apply_map_override(
                        &thing.name,
                        "AttributePayload",
                        thing.overrides.attribute_payload,
                        old_attrs,
                        &thing.attributes,
                    )?;
                    let groups = apply_list_override(
                        &thing.name,
                        thing.overrides.thing_groups,
                        old_groups,
                        &thing.groups,
                    )?;
                    let ttype = match thing.overrides.thing_type_name {
                        _ if ttype == thing.thing_type => ttype,
                        Override::Fail => {
                            return Err(RegisterError::Conflict(format!(
                                "Thing {} exists with a different ThingTypeName",
                                thing.name
                            )));
                        }
                        Override::DoNothing => ttype,
                        Override::Merge | Override::Replace => thing.thing_type.clone(),
                    };
                    tx.execute(
                        "UPDATE things SET attributes = ?2, thing_type = ?3, groups = ?4,
                         billing_group = COALESCE(?5, billing_group) WHERE name = ?1",
                        params![
                            thing.name,
                            Value::Object(attrs).to_string(),
                            ttype,
                            json!(groups).to_string(),
                            thing.billing_group
                        ],
                    )?;
                }
            }
            tx.execute(
                "INSERT OR IGNORE INTO thing_principals (thing, certificate_id) VALUES (?1, ?2)",
                params![thing.name, certificate_id],
            )?;
        }
        let status = match outcome.certificate_status {
            Some(CertStatus::Inactive) => INACTIVE,
            // A certificate registered without an AWS::IoT::Certificate resource stays usable
            // for nothing on AWS; the emulator activates only what the template activates.
            None => PENDING,
            Some(CertStatus::Active) => ACTIVE,
        };
        tx.execute(
            "UPDATE certificates SET status = ?2 WHERE id = ?1",
            params![certificate_id, status],
        )?;
        for policy in &outcome.policies {
            let (name, document) = match policy {
                PolicySpec::Named(name) => (name.as_str(), "{}"),
                PolicySpec::Document { name, document } => (name.as_str(), document.as_str()),
            };
            // A named policy's document is the one in policies/NAME.json now.
            tx.execute(
                "INSERT INTO policies (name, document) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET document = excluded.document",
                params![name, document],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO policy_principals (policy, certificate_id) VALUES (?1, ?2)",
                params![name, certificate_id],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes certificates still PENDING_ACTIVATION whose token has expired, as AWS does.
    /// Returns how many were deleted.
    pub fn sweep_expired(&self, now: i64) -> Result<usize, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let n = tx.execute(
            "DELETE FROM certificates WHERE status = ?1 AND id IN
             (SELECT certificate_id FROM tokens WHERE expires_at <= ?2)",
            params![PENDING, now],
        )?;
        tx.execute("DELETE FROM tokens WHERE expires_at <= ?1", [now])?;
        tx.commit()?;
        Ok(n)
    }

    /// The whole registry as JSON (for `fleetprov-emulator list` and tests).
    pub fn snapshot(&self) -> Result<Value, StoreError> {
        let conn = self.lock();
        let mut stmt = conn.prepare(
            "SELECT c.id, c.status, c.origin, c.created_at,
                    (SELECT MIN(expires_at) FROM tokens t WHERE t.certificate_id = c.id)
             FROM certificates c ORDER BY c.created_at, c.id",
        )?;
        let certificates = stmt
            .query_map([], |r| {
                Ok(json!({
                    "id": r.get::<_, String>(0)?,
                    "status": r.get::<_, String>(1)?,
                    "origin": r.get::<_, String>(2)?,
                    "createdAt": r.get::<_, i64>(3)?,
                    "tokenExpiresAt": r.get::<_, Option<i64>>(4)?,
                }))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut stmt = conn.prepare(
            "SELECT name, attributes, thing_type, groups, billing_group FROM things ORDER BY name",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut principals = conn.prepare(
            "SELECT certificate_id FROM thing_principals WHERE thing = ?1 ORDER BY certificate_id",
        )?;
        let mut things = Vec::new();
        for (name, attrs, ttype, groups, billing) in rows {
            let certs = principals
                .query_map([&name], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            things.push(json!({
                "name": name,
                "attributes": serde_json::from_str::<Value>(&attrs).unwrap_or(Value::Null),
                "thingType": ttype,
                "groups": serde_json::from_str::<Value>(&groups).unwrap_or(Value::Null),
                "billingGroup": billing,
                "certificates": certs,
            }));
        }
        let mut stmt = conn.prepare(
            "SELECT p.name, p.document,
                    (SELECT json_group_array(certificate_id) FROM policy_principals pp WHERE pp.policy = p.name)
             FROM policies p ORDER BY p.name",
        )?;
        let policies = stmt
            .query_map([], |r| {
                let targets: String = r.get(2)?;
                Ok(json!({
                    "name": r.get::<_, String>(0)?,
                    "document": r.get::<_, String>(1)?,
                    "certificates": serde_json::from_str::<Value>(&targets).unwrap_or(Value::Null),
                }))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(json!({
            "certificates": certificates,
            "things": things,
            "policies": policies,
        }))
    }
}

fn apply_map_override(
    thing: &str,
    what: &str,
    rule: Override,
    old: serde_json::Map<String, Value>,
    new: &std::collections::BTreeMap<String, String>,
) -> Result<serde_json::Map<String, Value>, RegisterError> {
    let new_map: serde_json::Map<String, Value> = new
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    if old == new_map {
        return Ok(old);
    }
    Ok(match rule {
        Override::Fail => {
            return Err(RegisterError::Conflict(format!(
                "Thing {thing} exists with a different {what}"
            )));
        }
        Override::DoNothing => old,
        Override::Replace => new_map,
        Override::Merge => {
            let mut merged = old;
            merged.extend(new_map);
            merged
        }
    })
}

fn apply_list_override(
    thing: &str,
    rule: Override,
    old: Vec<String>,
    new: &[String],
) -> Result<Vec<String>, RegisterError> {
    if old == new {
        return Ok(old);
    }
    Ok(match rule {
        Override::Fail => {
            return Err(RegisterError::Conflict(format!(
                "Thing {thing} exists with different ThingGroups"
            )));
        }
        Override::DoNothing => old,
        Override::Replace => new.to_vec(),
        Override::Merge => {
            let mut merged = old;
            for g in new {
                if !merged.contains(g) {
                    merged.push(g.clone());
                }
            }
            merged
        }
    })
}
