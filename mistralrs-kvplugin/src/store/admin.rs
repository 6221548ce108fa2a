//! Store operations: what a store holds (per model and level), removal by model or namespace,
//! and garbage collection by age and size.
//!
//! Invariants of the GC:
//! - It never leaves a chunk that lookups can no longer reach. Chunk names carry their index and
//!   their parent's hash (see `object.rs`), so a listing alone rebuilds every chain; an object is
//!   deleted only together with everything below it (its *subtree*), and judged by the newest
//!   write in that subtree. Objects are written once (`PutMode::Create`), so `last_modified` is
//!   when a prefix was last extended, not when it was last read.
//! - Nothing written less than `grace` ago is deleted, nor anything whose subtree was: a save in
//!   progress writes a chain from its first chunk on, and must not lose its parents. A chunk whose
//!   parent is gone (a GC that raced a writer, a crash) is an *orphan*, removed after the grace.
//! - Deletion runs deepest first, so a GC that stops half-way has only removed leaves.
//! - Objects of an older layout (`v1`) can never be read again: removed after the grace. Names it
//!   cannot parse are left alone and counted.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, SystemTime},
};

use futures::TryStreamExt;
use object_store::{path::Path, ObjectStore};
use serde::Serialize;

use super::layout::{ObjectName, LAYOUT_VERSION, LEGACY_LAYOUT_VERSIONS};
use crate::error::{Error, Result};

/// One object of a store, as listed.
#[derive(Debug, Clone)]
pub struct StoredObject {
    /// Its full path.
    pub path: Path,
    /// The model segment (the first 128 bits of the fingerprint, hex).
    pub model: String,
    /// What it is, for objects of the current layout with names it writes.
    pub name: Option<ObjectName>,
    /// It belongs to an older layout.
    pub legacy: bool,
    /// Bytes.
    pub size: u64,
    /// When it was written.
    pub last_modified: SystemTime,
}

/// Lists every object under `namespace`.
pub async fn list(store: &dyn ObjectStore, namespace: &str) -> Result<Vec<StoredObject>> {
    let prefix = Path::from(namespace);
    let metas: Vec<object_store::ObjectMeta> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| Error::InvalidInput(format!("listing the store: {e}")))?;
    let mut objects = Vec::with_capacity(metas.len());
    for meta in metas {
        let parts: Vec<String> = meta
            .location
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        let n = parts.len();
        if n < 3 {
            continue;
        }
        let (version, model, file) = (&parts[n - 3], &parts[n - 2], &parts[n - 1]);
        let legacy = LEGACY_LAYOUT_VERSIONS.contains(&version.as_str());
        if !legacy && version != LAYOUT_VERSION {
            continue;
        }
        objects.push(StoredObject {
            name: if legacy {
                None
            } else {
                ObjectName::parse(file)
            },
            model: model.clone(),
            legacy,
            size: meta.size,
            last_modified: SystemTime::from(meta.last_modified),
            path: meta.location,
        });
    }
    Ok(objects)
}

/// What a store holds for one model.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelUsage {
    /// The model segment of the paths (the first 128 bits of its fingerprint).
    pub model: String,
    /// Objects.
    pub objects: u64,
    /// Bytes.
    pub bytes: u64,
    /// Full chunks (each level counted).
    pub chunks: u64,
    /// Tails.
    pub tails: u64,
    /// Bytes per codec level.
    pub bytes_by_level: BTreeMap<String, u64>,
    /// Seconds since the oldest write.
    pub oldest_age_s: f64,
    /// Seconds since the newest write.
    pub newest_age_s: f64,
}

/// What a store holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreUsage {
    /// Objects of the current layout.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Per model, largest first.
    pub models: Vec<ModelUsage>,
    /// Objects of an older layout (never read; removed by the GC).
    pub legacy_objects: u64,
    /// Their bytes.
    pub legacy_bytes: u64,
    /// Objects with names this version does not write (left alone).
    pub unknown_objects: u64,
}

fn age_s(now: SystemTime, t: SystemTime) -> f64 {
    now.duration_since(t).unwrap_or_default().as_secs_f64()
}

/// Sums `objects` per model and level.
pub fn usage(objects: &[StoredObject], now: SystemTime) -> StoreUsage {
    let mut out = StoreUsage::default();
    let mut models: HashMap<&str, ModelUsage> = HashMap::new();
    for o in objects {
        if o.legacy {
            out.legacy_objects += 1;
            out.legacy_bytes += o.size;
            continue;
        }
        let Some(name) = &o.name else {
            out.unknown_objects += 1;
            continue;
        };
        out.objects += 1;
        out.bytes += o.size;
        let age = age_s(now, o.last_modified);
        let m = models.entry(&o.model).or_insert_with(|| ModelUsage {
            model: o.model.clone(),
            oldest_age_s: age,
            newest_age_s: age,
            ..ModelUsage::default()
        });
        m.objects += 1;
        m.bytes += o.size;
        match name {
            ObjectName::Chunk { .. } => m.chunks += 1,
            ObjectName::Tail { .. } => m.tails += 1,
        }
        *m.bytes_by_level
            .entry(name.level().name().to_string())
            .or_default() += o.size;
        m.oldest_age_s = m.oldest_age_s.max(age);
        m.newest_age_s = m.newest_age_s.min(age);
    }
    out.models = models.into_values().collect();
    out.models
        .sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.model.cmp(&b.model)));
    out
}

/// What the GC may delete.
#[derive(Debug, Clone, PartialEq)]
pub struct GcPolicy {
    /// Delete subtrees whose newest write is older than this.
    pub older_than: Option<Duration>,
    /// Then delete the oldest subtrees until the store holds at most this many bytes.
    pub max_bytes: Option<u64>,
    /// Never delete what was written (or whose subtree was written) more recently than this.
    pub grace: Duration,
}

/// One object the GC deletes, and why.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Deletion {
    /// Its path.
    pub path: String,
    /// Its bytes.
    pub bytes: u64,
    /// Seconds since the newest write of its subtree.
    pub age_s: f64,
    /// `expired`, `over max_bytes`, `orphan` or `legacy layout`.
    pub reason: &'static str,
    /// Full chunks before it (deleted deepest first).
    #[serde(skip)]
    pub depth: usize,
}

/// What a GC run deletes and keeps.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcPlan {
    /// Objects to delete, deepest first.
    pub delete: Vec<Deletion>,
    /// Bytes deleted.
    pub deleted_bytes: u64,
    /// Objects kept (current layout, known names).
    pub kept_objects: u64,
    /// Bytes kept.
    pub kept_bytes: u64,
}

/// A chain node: a chunk (all its levels) or a tail.
struct Node<'a> {
    objects: Vec<usize>,
    index: usize,
    newest: SystemTime,
    children: Vec<usize>,
    /// `(model, parent's short hash)`; `None` for a chain's first chunk (index 0).
    parent: Option<(&'a str, &'a str)>,
}

impl<'a> Node<'a> {
    fn new(model: &'a str, name: &'a ObjectName) -> Self {
        Node {
            objects: Vec::new(),
            index: name.index(),
            newest: SystemTime::UNIX_EPOCH,
            children: Vec::new(),
            parent: (name.index() > 0).then_some((model, name.parent())),
        }
    }
}

/// Decides what a GC run deletes (no I/O: see [`execute`]).
pub fn plan_gc(objects: &[StoredObject], policy: &GcPolicy, now: SystemTime) -> GcPlan {
    let cutoff = |d: Duration| now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH);
    let grace_cutoff = cutoff(policy.grace);
    let mut plan = GcPlan::default();
    let delete = |plan: &mut GcPlan, o: &StoredObject, newest: SystemTime, depth, reason| {
        plan.deleted_bytes += o.size;
        plan.delete.push(Deletion {
            path: o.path.to_string(),
            bytes: o.size,
            age_s: age_s(now, newest),
            reason,
            depth,
        });
    };
    for o in objects.iter().filter(|o| o.legacy) {
        if o.last_modified < grace_cutoff {
            delete(&mut plan, o, o.last_modified, usize::MAX, "legacy layout");
        }
    }

    // Build the forest of every model: nodes keyed by (model, own hash) for chunks, one node
    // per tail object.
    let mut nodes: Vec<Node> = Vec::new();
    let mut chunk_node: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, o) in objects.iter().enumerate() {
        let Some(name) = o.name.as_ref().filter(|_| !o.legacy) else {
            continue;
        };
        let node = match name {
            ObjectName::Chunk { hash, .. } => {
                *chunk_node.entry((&o.model, hash)).or_insert_with(|| {
                    nodes.push(Node::new(&o.model, name));
                    nodes.len() - 1
                })
            }
            ObjectName::Tail { .. } => {
                nodes.push(Node::new(&o.model, name));
                nodes.len() - 1
            }
        };
        nodes[node].objects.push(i);
        nodes[node].newest = nodes[node].newest.max(o.last_modified);
    }
    let mut tops = Vec::new(); // roots and orphans, with whether each is an orphan
    for id in 0..nodes.len() {
        match nodes[id].parent {
            None => tops.push((id, false)),
            Some(key) => match chunk_node.get(&key) {
                Some(&p) if nodes[p].index + 1 == nodes[id].index => nodes[p].children.push(id),
                _ => tops.push((id, true)),
            },
        }
    }

    // Newest write of each subtree (iterative post-order; hostile names cannot loop it: each node
    // is entered once).
    let mut subtree_newest: Vec<SystemTime> = nodes.iter().map(|n| n.newest).collect();
    let mut order = Vec::with_capacity(nodes.len());
    let mut seen = HashSet::new();
    let mut top_of = vec![(usize::MAX, false); nodes.len()];
    for &(top, orphan) in &tops {
        let mut stack = vec![top];
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            top_of[id] = (top, orphan);
            order.push(id);
            stack.extend(nodes[id].children.iter().copied());
        }
    }
    for &id in order.iter().rev() {
        for &child in &nodes[id].children {
            subtree_newest[id] = subtree_newest[id].max(subtree_newest[child]);
        }
    }

    let mut doomed: Vec<Option<&'static str>> = vec![None; nodes.len()];
    for &id in &order {
        let newest = subtree_newest[id];
        if newest >= grace_cutoff {
            continue;
        }
        if top_of[id].1 {
            doomed[id] = Some("orphan");
        } else if policy.older_than.is_some_and(|d| newest < cutoff(d)) {
            doomed[id] = Some("expired");
        }
    }
    if let Some(max_bytes) = policy.max_bytes {
        let bytes = |id: usize| -> u64 { nodes[id].objects.iter().map(|&i| objects[i].size).sum() };
        let mut kept: u64 = order
            .iter()
            .filter(|&&id| doomed[id].is_none())
            .map(|&id| bytes(id))
            .sum();
        // Oldest subtrees first; on a tie, deeper first: every prefix of this order holds the
        // whole subtree of each node in it.
        let mut candidates: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&id| doomed[id].is_none() && subtree_newest[id] < grace_cutoff)
            .collect();
        candidates.sort_by(|&a, &b| {
            subtree_newest[a]
                .cmp(&subtree_newest[b])
                .then(nodes[b].index.cmp(&nodes[a].index))
        });
        for id in candidates {
            if kept <= max_bytes {
                break;
            }
            doomed[id] = Some("over max_bytes");
            kept -= bytes(id);
        }
    }
    for &id in &order {
        match doomed[id] {
            Some(reason) => {
                for &i in &nodes[id].objects {
                    delete(
                        &mut plan,
                        &objects[i],
                        subtree_newest[id],
                        nodes[id].index,
                        reason,
                    );
                }
            }
            None => {
                for &i in &nodes[id].objects {
                    plan.kept_objects += 1;
                    plan.kept_bytes += objects[i].size;
                }
            }
        }
    }
    plan.delete
        .sort_by(|a, b| b.depth.cmp(&a.depth).then(a.path.cmp(&b.path)));
    plan
}

/// Every object of `model` (a fingerprint prefix of at least 8 hex digits, as `store ls` shows),
/// or of every model when `model` is `None`, to delete deepest first.
pub fn plan_remove(objects: &[StoredObject], model: Option<&str>) -> Result<GcPlan> {
    if let Some(m) = model {
        if m.len() < 8 || !m.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidInput(format!(
                "--model `{m}`: give at least 8 hex digits of the model's fingerprint (see `kvplugin store ls`)"
            )));
        }
    }
    let mut plan = GcPlan::default();
    for o in objects {
        if model.is_some_and(|m| !o.model.starts_with(&m.to_ascii_lowercase())) {
            if o.name.is_some() {
                plan.kept_objects += 1;
                plan.kept_bytes += o.size;
            }
            continue;
        }
        plan.deleted_bytes += o.size;
        plan.delete.push(Deletion {
            path: o.path.to_string(),
            bytes: o.size,
            age_s: 0.0,
            reason: "removed",
            depth: o.name.as_ref().map_or(usize::MAX, ObjectName::index),
        });
    }
    plan.delete
        .sort_by(|a, b| b.depth.cmp(&a.depth).then(a.path.cmp(&b.path)));
    Ok(plan)
}

/// Deletes what `plan` lists, one depth at a time from the deepest (objects already gone count as
/// deleted). Returns how many were deleted.
pub async fn execute(store: &dyn ObjectStore, plan: &GcPlan) -> Result<usize> {
    let mut deleted = 0;
    let mut start = 0;
    while start < plan.delete.len() {
        let depth = plan.delete[start].depth;
        let end = plan.delete[start..]
            .iter()
            .position(|d| d.depth != depth)
            .map_or(plan.delete.len(), |n| start + n);
        let paths: Vec<Path> = plan.delete[start..end]
            .iter()
            .map(|d| Path::from(d.path.as_str()))
            .collect();
        // Sixteen at a time (plain joins: a `buffer_unordered` of borrowing futures here trips
        // rustc's higher-ranked `Send` check in the server's handlers).
        for batch in paths.chunks(16) {
            let results = futures::future::join_all(batch.iter().map(|p| store.delete(p))).await;
            for r in results {
                match r {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                    Err(e) => {
                        return Err(Error::InvalidInput(format!("deleting from the store: {e}")))
                    }
                }
            }
        }
        start = end;
    }
    Ok(deleted)
}

/// Lists the store, plans a GC under `policy` and, unless `dry_run`, carries it out. Returns the
/// plan and how many objects were deleted.
pub async fn gc(
    store: &dyn ObjectStore,
    namespace: &str,
    policy: &GcPolicy,
    dry_run: bool,
) -> Result<(GcPlan, usize)> {
    let objects = list(store, namespace).await?;
    carry_out(store, plan_gc(&objects, policy, SystemTime::now()), dry_run).await
}

/// Like [`gc`], removing every object of `model` (or of every model).
pub async fn remove(
    store: &dyn ObjectStore,
    namespace: &str,
    model: Option<&str>,
    dry_run: bool,
) -> Result<(GcPlan, usize)> {
    let objects = list(store, namespace).await?;
    carry_out(store, plan_remove(&objects, model)?, dry_run).await
}

/// Executes `plan` unless `dry_run`; the plan and how many objects were deleted.
async fn carry_out(
    store: &dyn ObjectStore,
    plan: GcPlan,
    dry_run: bool,
) -> Result<(GcPlan, usize)> {
    let deleted = if dry_run {
        0
    } else {
        execute(store, &plan).await?
    };
    Ok((plan, deleted))
}

/// Parses `90s`, `15m`, `12h`, `7d` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = number.parse().map_err(|_| {
        Error::InvalidInput(format!(
            "`{text}` is not a duration (e.g. 90s, 15m, 12h, 7d)"
        ))
    })?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(Error::InvalidInput(format!(
                "`{text}`: unknown unit `{unit}` (s, m, h, d)"
            )))
        }
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// Parses `500M`, `10G`, `2T` (powers of 1024; a bare number is bytes).
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = number
        .parse()
        .map_err(|_| Error::InvalidInput(format!("`{text}` is not a size (e.g. 500M, 10G)")))?;
    let shift = match unit.trim_end_matches("iB").trim_end_matches('B') {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(Error::InvalidInput(format!(
                "`{text}`: unknown unit `{unit}` (K, M, G, T)"
            )))
        }
    };
    Ok(n.saturating_mul(1 << shift))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Level;

    const T0: u64 = 1_000_000;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn h(n: u32) -> String {
        format!("{n:032x}")
    }

    /// A chunk `hash` at `index` under `parent`, written at `t`.
    fn chunk(model: &str, index: usize, parent: u32, hash: u32, t: u64, size: u64) -> StoredObject {
        let name = ObjectName::Chunk {
            index,
            parent: h(parent),
            hash: h(hash),
            level: Level::High,
        };
        StoredObject {
            path: Path::from(format!(
                "kv/{}/{model}/{name}",
                crate::store::layout::LAYOUT_VERSION
            )),
            model: model.into(),
            name: Some(name),
            legacy: false,
            size,
            last_modified: at(t),
        }
    }

    fn tail(model: &str, index: usize, parent: u32, t: u64) -> StoredObject {
        let name = ObjectName::Tail {
            index,
            parent: h(parent),
            level: Level::Lossless,
        };
        StoredObject {
            path: Path::from(format!(
                "kv/{}/{model}/{name}",
                crate::store::layout::LAYOUT_VERSION
            )),
            model: model.into(),
            name: Some(name),
            legacy: false,
            size: 10,
            last_modified: at(t),
        }
    }

    fn deleted(plan: &GcPlan) -> Vec<(String, &'static str)> {
        plan.delete
            .iter()
            .map(|d| (d.path.rsplit('/').next().unwrap().to_string(), d.reason))
            .collect()
    }

    /// Chain A: 1 -> 2 -> 3 (+ tail after 3), old; chain B: 10 -> 11 where 11 is recent;
    /// chunk 20 is an orphan (its parent 99 is gone).
    fn store() -> Vec<StoredObject> {
        vec![
            chunk("m", 0, 0, 1, T0, 100),
            chunk("m", 1, 1, 2, T0 + 10, 100),
            chunk("m", 2, 2, 3, T0 + 20, 100),
            tail("m", 3, 3, T0 + 20),
            chunk("m", 0, 0, 10, T0, 100),
            chunk("m", 1, 10, 11, T0 + 5000, 100),
            chunk("m", 3, 99, 20, T0, 100),
        ]
    }

    #[test]
    fn ttl_deletes_whole_subtrees_judged_by_their_newest_write() {
        let policy = GcPolicy {
            older_than: Some(Duration::from_secs(1000)),
            max_bytes: None,
            grace: Duration::from_secs(60),
        };
        let plan = plan_gc(&store(), &policy, at(T0 + 5100));
        let gone = deleted(&plan);
        // Chain A expired (newest write T0+20); chain B's root stays with its recent child;
        // the orphan goes. Deepest first.
        assert_eq!(gone.len(), 5, "{gone:?}");
        let pos = |name: String| gone.iter().position(|(n, _)| *n == name).unwrap();
        let tail_at = pos(format!("t-3-{}.lossless", h(3)));
        assert_eq!(gone[tail_at].1, "expired");
        assert!(
            tail_at < pos(format!("c-2-{}-{}.high", h(2), h(3))),
            "deepest first"
        );
        assert!(gone.contains(&(format!("c-3-{}-{}.high", h(99), h(20)), "orphan")));
        assert_eq!(
            gone.last().unwrap().0,
            format!("c-0-{}-{}.high", h(0), h(1))
        );
        assert!(
            !gone.iter().any(|(n, _)| n.contains(&h(11))),
            "recent chunk kept"
        );
        assert_eq!(plan.kept_objects, 2);
    }

    #[test]
    fn grace_protects_a_chain_being_written_and_its_parents() {
        let policy = GcPolicy {
            older_than: Some(Duration::from_secs(1)),
            max_bytes: Some(0),
            grace: Duration::from_secs(600),
        };
        // At T0+5100 chunk 11 (T0+5000) is inside the grace: it and its parent 10 stay, even
        // over max_bytes; everything else goes.
        let plan = plan_gc(&store(), &policy, at(T0 + 5100));
        let gone = deleted(&plan);
        assert_eq!(gone.len(), 5, "{gone:?}");
        assert!(!gone
            .iter()
            .any(|(n, _)| n.contains(&h(10)) || n.contains(&h(11))));
    }

    #[test]
    fn max_bytes_removes_oldest_subtrees_first_and_never_a_parent_alone() {
        let policy = GcPolicy {
            older_than: None,
            max_bytes: Some(250),
            grace: Duration::ZERO,
        };
        let plan = plan_gc(&store(), &policy, at(T0 + 6000));
        // 610 bytes; the orphan (100) goes whatever the size; then the oldest subtrees: chain A
        // (newest T0+20) from its tail up (10 + 100 + 100 + 100) leaves 200 <= 250.
        let gone = deleted(&plan);
        assert_eq!(plan.kept_bytes, 200, "{gone:?}");
        assert!(gone
            .iter()
            .all(|(n, _)| !n.contains(&h(10)) && !n.contains(&h(11))));
        // Any prefix of the deletion order holds whole subtrees: a parent comes after children.
        let pos = |hash: u32| {
            gone.iter()
                .position(|(n, _)| n.ends_with(&format!("{}.high", h(hash))))
        };
        assert!(pos(3) < pos(2) && pos(2) < pos(1));
    }

    #[test]
    fn remove_by_model_needs_a_real_prefix() {
        let mut objects = store();
        objects.push(chunk("abcdef0123", 0, 0, 1, T0, 7));
        let plan = plan_remove(&objects, Some("abcdef01")).unwrap();
        assert_eq!(plan.delete.len(), 1);
        assert_eq!(plan.deleted_bytes, 7);
        assert!(plan_remove(&objects, Some("ab")).is_err());
        assert_eq!(plan_remove(&objects, None).unwrap().delete.len(), 8);
    }

    #[test]
    fn durations_and_sizes_parse_with_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_duration("7w").is_err());
        assert_eq!(parse_bytes("10G").unwrap(), 10 << 30);
        assert_eq!(parse_bytes("500MiB").unwrap(), 500 << 20);
        assert_eq!(parse_bytes("123").unwrap(), 123);
        assert!(parse_bytes("1Q").is_err());
    }
}
