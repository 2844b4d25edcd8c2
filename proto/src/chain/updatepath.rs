//! updatepath (sdk `common/updatepath`): moves the connection onto our own
//! path segment for the rest of the chain and back to the caller's on return.
//!
//! With `i = path.index`: `path_segments[i].id` must equal `connection.id`
//! and `i + 1 ≤ len`. Segment `i+1` with our name keeps its id (refresh); with
//! another name it is renamed and gets a new id; missing, it is appended.
//! Inside the chain `connection.id` is our segment's id and `index = i + 1`.

use async_trait::async_trait;

use super::{ChainError, Ctx, Element, HopError, Next, Req, path_mut};
use crate::connection::{Connection, PathSegment};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error(
        "connection.path.index {index} is out of range: path has {len} segments, so index + 1 must be ≤ {len}"
    )]
    IndexOutOfRange { index: u32, len: usize },
    #[error(
        "connection.id {conn_id:?} does not match connection.path.path_segments[{index}].id {segment_id:?}"
    )]
    IdMismatch {
        index: u32,
        conn_id: String,
        segment_id: String,
    },
}

pub struct UpdatePath {
    name: String,
}

impl UpdatePath {
    pub fn new(name: impl Into<String>) -> Self {
        UpdatePath { name: name.into() }
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Moves `conn` onto the segment named `name`; returns the caller's index.
pub fn update_path(conn: &mut Connection, name: &str) -> Result<u32, PathError> {
    let conn_id = conn.id.clone();
    let path = path_mut(conn);
    if path.path_segments.is_empty() {
        // A path starts here (a client calling us directly without one).
        path.index = 0;
        let id = if conn_id.is_empty() {
            new_id()
        } else {
            conn_id
        };
        path.path_segments.push(PathSegment {
            name: name.to_owned(),
            id: id.clone(),
            ..Default::default()
        });
        conn.id = id;
        return Ok(0);
    }
    let index = path.index;
    let i = index as usize;
    if let Some(seg) = path.path_segments.get(i).filter(|s| s.name == name) {
        // Called at our own segment already.
        conn.id = seg.id.clone();
        return Ok(index);
    }
    let len = path.path_segments.len();
    if i + 1 > len {
        return Err(PathError::IndexOutOfRange { index, len });
    }
    if path.path_segments[i].id != conn_id {
        return Err(PathError::IdMismatch {
            index,
            conn_id,
            segment_id: path.path_segments[i].id.clone(),
        });
    }
    let next = i + 1;
    let id = match path.path_segments.get_mut(next) {
        Some(seg) if seg.name == name => seg.id.clone(),
        Some(seg) => {
            seg.name = name.to_owned();
            seg.id = new_id();
            seg.id.clone()
        }
        None => {
            let id = new_id();
            path.path_segments.push(PathSegment {
                name: name.to_owned(),
                id: id.clone(),
                ..Default::default()
            });
            id
        }
    };
    path.index = next as u32;
    conn.id = id;
    Ok(index)
}

/// Puts a returned connection back on the caller's segment.
fn restore(conn: &mut Connection, index: u32) {
    let path = path_mut(conn);
    path.index = index;
    if let Some(seg) = path.path_segments.get(index as usize) {
        conn.id = seg.id.clone();
    }
}

#[async_trait]
impl<E: HopError> Element<E> for UpdatePath {
    async fn request(
        &self,
        ctx: &mut Ctx<E>,
        mut req: Req,
        next: Next<E>,
    ) -> Result<Connection, E> {
        let index = update_path(&mut req.conn, &self.name).map_err(ChainError::from)?;
        let mut conn = next.request(ctx, req).await?;
        restore(&mut conn, index);
        Ok(conn)
    }

    async fn close(&self, ctx: &mut Ctx<E>, mut conn: Connection, next: Next<E>) -> Result<(), E> {
        update_path(&mut conn, &self.name).map_err(ChainError::from)?;
        next.close(ctx, conn).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::Path;

    const ID1: &str = "seg-1";
    const ID2: &str = "seg-2";
    const ID3: &str = "seg-3";

    fn conn(id: &str, index: u32, segments: usize) -> Connection {
        let all = [("nse-1", ID1), ("nse-2", ID2), ("nse-3", ID3)];
        Connection {
            id: id.into(),
            path: (segments > 0).then(|| Path {
                index,
                path_segments: all[..segments]
                    .iter()
                    .map(|(n, i)| PathSegment {
                        name: (*n).into(),
                        id: (*i).into(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    fn names(c: &Connection) -> Vec<&str> {
        c.path
            .as_ref()
            .unwrap()
            .path_segments
            .iter()
            .map(|s| s.name.as_str())
            .collect()
    }

    #[test]
    fn no_path_no_id_starts_a_path_with_a_new_id() {
        let mut c = conn("", 0, 0);
        assert_eq!(update_path(&mut c, "nse-1"), Ok(0));
        assert_eq!(names(&c), ["nse-1"]);
        assert!(!c.id.is_empty());
        assert_eq!(c.path.unwrap().path_segments[0].id, c.id);
    }

    #[test]
    fn no_path_keeps_the_given_id() {
        let mut c = conn("conn-x", 0, 0);
        assert_eq!(update_path(&mut c, "nse-1"), Ok(0));
        assert_eq!(c.id, "conn-x");
        assert_eq!(c.path.unwrap().path_segments[0].id, "conn-x");
    }

    #[test]
    fn same_name_at_index_takes_that_segments_id() {
        let mut c = conn("other", 1, 2);
        assert_eq!(update_path(&mut c, "nse-2"), Ok(1));
        assert_eq!((c.id.as_str(), c.path.as_ref().unwrap().index), (ID2, 1));
        assert_eq!(names(&c), ["nse-1", "nse-2"]);
    }

    #[test]
    fn different_name_and_wrong_id_is_rejected() {
        let mut c = conn("other", 1, 2);
        let e = update_path(&mut c, "nse-3").unwrap_err();
        assert_eq!(
            e,
            PathError::IdMismatch {
                index: 1,
                conn_id: "other".into(),
                segment_id: ID2.into()
            }
        );
        assert!(e.to_string().contains("path_segments[1].id"), "{e}");
    }

    #[test]
    fn index_out_of_range_is_rejected() {
        let mut c = conn(ID2, 3, 2);
        let e = update_path(&mut c, "nse-3").unwrap_err();
        assert_eq!(e, PathError::IndexOutOfRange { index: 3, len: 2 });
        let mut c = conn(ID2, 2, 2);
        assert!(update_path(&mut c, "nse-3").is_err());
    }

    #[test]
    fn different_next_name_is_renamed_with_a_new_id() {
        let mut c = conn(ID2, 1, 3);
        c.path.as_mut().unwrap().path_segments[2].name = "different".into();
        assert_eq!(update_path(&mut c, "nse-3"), Ok(1));
        let p = c.path.as_ref().unwrap();
        assert_eq!((p.index, p.path_segments[2].name.as_str()), (2, "nse-3"));
        assert_eq!(c.id, p.path_segments[2].id);
        assert!(c.id != ID3 && c.id != ID2);
    }

    #[test]
    fn no_next_segment_appends_ours() {
        let mut c = conn(ID2, 1, 2);
        assert_eq!(update_path(&mut c, "nse-3"), Ok(1));
        assert_eq!(names(&c), ["nse-1", "nse-2", "nse-3"]);
        let p = c.path.as_ref().unwrap();
        assert_eq!(p.index, 2);
        assert_eq!(c.id, p.path_segments[2].id);
    }

    #[test]
    fn same_next_name_reuses_its_id() {
        let mut c = conn(ID2, 1, 3);
        assert_eq!(update_path(&mut c, "nse-3"), Ok(1));
        assert_eq!((c.id.as_str(), c.path.unwrap().index), (ID3, 2));
    }

    #[tokio::test]
    async fn the_caller_gets_its_own_id_and_index_back() {
        let chain: Next<ChainError> =
            Next::chain(vec![std::sync::Arc::new(UpdatePath::new("nse-3"))]);
        let req = Req {
            conn: conn(ID2, 1, 2),
            preferences: vec![],
        };
        let out = chain.request(&mut Ctx::internal(), req).await.unwrap();
        assert_eq!(
            (out.id.as_str(), out.path.as_ref().unwrap().index),
            (ID2, 1)
        );
        assert_eq!(names(&out), ["nse-1", "nse-2", "nse-3"]);
    }
}
