//! The network-function slot: what this endpoint does for a connection once
//! it has addresses and a mechanism (e.g. put a mesh proxy in its path).
//!
//! Functions apply in order on every Request (first and refresh) and are
//! undone in reverse order on Close and expiry. If a new connection fails
//! part-way, the functions already applied are undone, so nothing is left
//! half-applied; a failed refresh leaves the established state alone.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use nsm_api::chain::{Ctx, Element, Next, Req};
use nsm_api::connection::Connection;

use crate::error::NseError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FunctionError {
    /// The connection asks for something this function cannot do (the caller's fault).
    #[error("network function {function}: {reason}")]
    Rejected { function: String, reason: String },
    /// The function could not do its work.
    #[error("network function {function} failed: {reason}")]
    Failed { function: String, reason: String },
    /// The endpoint lacks what the function needs (e.g. a capability).
    #[error("network function {function} is unavailable: {reason}")]
    Precondition { function: String, reason: String },
}

/// One network function of the endpoint.
#[async_trait]
pub trait NetworkFunction: Send + Sync + 'static {
    /// Short name for logs and errors.
    fn name(&self) -> &str;

    /// Applies the function for `conn` (addresses and mechanism already set);
    /// may add to it (e.g. `context.extra_context` for the hop). Called again
    /// on every refresh, so it must be idempotent.
    async fn apply(&self, conn: &mut Connection) -> Result<(), FunctionError>;

    /// Undoes everything `apply` did for this connection. Idempotent.
    async fn undo(&self, conn: &Connection) -> Result<(), FunctionError>;
}

/// Runs the endpoint's network functions (none: a pass-through).
pub struct Functions {
    list: Vec<Arc<dyn NetworkFunction>>,
    /// Connections whose functions are applied.
    applied: Mutex<HashSet<String>>,
}

impl Functions {
    pub fn new(list: Vec<Arc<dyn NetworkFunction>>) -> Self {
        Functions {
            list,
            applied: Mutex::new(HashSet::new()),
        }
    }

    fn applied(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Undoes `funcs` in reverse order; the first error is returned, every undo still runs.
    async fn undo_all(
        funcs: &[Arc<dyn NetworkFunction>],
        conn: &Connection,
    ) -> Result<(), FunctionError> {
        let mut first = None;
        for f in funcs.iter().rev() {
            if let Err(e) = f.undo(conn).await {
                tracing::warn!(id = %conn.id, error = %e, "undo failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl Element<NseError> for Functions {
    async fn request(
        &self,
        ctx: &mut Ctx<NseError>,
        mut req: Req,
        next: Next<NseError>,
    ) -> Result<Connection, NseError> {
        if self.list.is_empty() {
            return next.request(ctx, req).await;
        }
        let id = req.conn.id.clone();
        let new = !self.applied().contains(&id);
        for (i, f) in self.list.iter().enumerate() {
            if let Err(e) = f.apply(&mut req.conn).await {
                if new {
                    let _ = Self::undo_all(&self.list[..=i], &req.conn).await;
                }
                return Err(e.into());
            }
        }
        let undo_conn = new.then(|| req.conn.clone());
        match next.request(ctx, req).await {
            Ok(conn) => {
                self.applied().insert(id);
                Ok(conn)
            }
            Err(e) => {
                if let Some(c) = undo_conn {
                    let _ = Self::undo_all(&self.list, &c).await;
                }
                Err(e)
            }
        }
    }

    async fn close(
        &self,
        ctx: &mut Ctx<NseError>,
        conn: Connection,
        next: Next<NseError>,
    ) -> Result<(), NseError> {
        if self.list.is_empty() {
            return next.close(ctx, conn).await;
        }
        let undone = Self::undo_all(&self.list, &conn).await;
        self.applied().remove(&conn.id);
        let res = next.close(ctx, conn).await;
        undone?;
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records apply/undo calls into a shared log; fails `apply` when told.
    struct Fake {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
        fail: bool,
    }

    #[async_trait]
    impl NetworkFunction for Fake {
        fn name(&self) -> &str {
            self.name
        }
        async fn apply(&self, conn: &mut Connection) -> Result<(), FunctionError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("apply {}", self.name));
            if self.fail {
                return Err(FunctionError::Failed {
                    function: self.name.into(),
                    reason: "boom".into(),
                });
            }
            conn.labels.insert(self.name.into(), "on".into());
            Ok(())
        }
        async fn undo(&self, _: &Connection) -> Result<(), FunctionError> {
            self.log.lock().unwrap().push(format!("undo {}", self.name));
            Ok(())
        }
    }

    fn chain(fail_b: bool) -> (Next<NseError>, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let f = |name, fail| {
            Arc::new(Fake {
                name,
                log: log.clone(),
                fail,
            }) as Arc<dyn NetworkFunction>
        };
        let funcs = Functions::new(vec![f("a", false), f("b", fail_b), f("c", false)]);
        (Next::chain(vec![Arc::new(funcs)]), log)
    }

    fn req() -> Req {
        Req {
            conn: Connection {
                id: "x".into(),
                ..Default::default()
            },
            preferences: vec![],
        }
    }

    #[tokio::test]
    async fn apply_in_order_undo_in_reverse() {
        let (chain, log) = chain(false);
        let out = chain.request(&mut Ctx::internal(), req()).await.unwrap();
        assert_eq!(out.labels.len(), 3);
        chain.close(&mut Ctx::internal(), out).await.unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            [
                "apply a", "apply b", "apply c", "undo c", "undo b", "undo a"
            ]
        );
    }

    #[tokio::test]
    async fn a_failing_function_undoes_what_was_applied() {
        let (chain, log) = chain(true);
        let e = chain
            .request(&mut Ctx::internal(), req())
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("network function b failed: boom"),
            "{e}"
        );
        assert_eq!(
            *log.lock().unwrap(),
            ["apply a", "apply b", "undo b", "undo a"]
        );
    }
}
