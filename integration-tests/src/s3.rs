//! Real S3 servers on 127.0.0.1 for the tests: started by the test, stopped when dropped.
//!
//! Both are installed by `make setup` into `$KVPLUGIN_TOOLS/bin` (default
//! `~/.cache/mistralrs-kvplugin/tools/bin`):
//! - s3s-fs 0.14.1 serves a folder as S3 and checks request signatures;
//! - Garage 2.5.0, a distributed object store, here as a single node (sqlite metadata, one
//!   zone, replication factor 1) with its own RPC secret, a bucket and an imported key.

use std::{
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mistralrs_kvplugin::config::PluginConfig;

/// Where `make setup` installs the servers.
pub fn tools_bin() -> PathBuf {
    std::env::var_os("KVPLUGIN_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/mistralrs-kvplugin/tools")
        })
        .join("bin")
}

/// A running S3 server with one bucket.
pub struct S3Server {
    child: Option<Child>,
    /// `http://127.0.0.1:port`.
    pub endpoint: String,
    /// The bucket the tests use.
    pub bucket: String,
    /// Credentials the server accepts.
    pub access_key: String,
    /// Credentials the server accepts.
    pub secret_key: String,
    /// The region requests are signed for.
    pub region: String,
    _root: tempfile::TempDir,
}

/// A random byte from the OS (for a fresh Garage RPC secret per server).
fn rand_byte() -> u8 {
    use std::io::Read;
    let mut b = [0u8; 1];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("/dev/urandom");
    b[0]
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl S3Server {
    /// Starts s3s-fs over a fresh temporary folder with bucket `kvplugin-test`.
    pub fn start_s3s_fs() -> Self {
        let binary = tools_bin().join("s3s-fs");
        assert!(
            binary.is_file(),
            "{} is missing: run `make setup`",
            binary.display()
        );
        let root = tempfile::tempdir().expect("temp dir");
        let bucket = "kvplugin-test".to_string();
        std::fs::create_dir(root.path().join(&bucket)).expect("bucket folder");
        let port = free_port();
        let (access_key, secret_key) = (
            "kvplugin-access".to_string(),
            "kvplugin-secret-key".to_string(),
        );
        let child = Command::new(&binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", &access_key, "--secret-key", &secret_key])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        let server = Self {
            child: Some(child),
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket,
            access_key,
            secret_key,
            region: "us-east-1".into(),
            _root: root,
        };
        server.wait_until_listening(port);
        server
    }

    fn wait_until_listening(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the S3 server did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a single-node Garage over a fresh temporary folder: lays out the node, creates
    /// bucket `kvplugin-test` and a key allowed to read and write it.
    pub fn start_garage() -> Self {
        let binary = tools_bin().join("garage");
        assert!(
            binary.is_file(),
            "{} is missing: run `make setup`",
            binary.display()
        );
        let root = tempfile::tempdir().expect("temp dir");
        let (s3_port, rpc_port) = (free_port(), free_port());
        let secret: String = (0..32).map(|_| format!("{:02x}", rand_byte())).collect();
        let config = write_garage_config(root.path(), 1, rpc_port, s3_port, &secret);
        let child = spawn_garage(&config);
        // Key ids are `GK` + 24 hex digits, secrets 64 hex digits.
        let access_key = format!("GK{}", &secret[..24]);
        let secret_key = secret.chars().rev().collect::<String>();
        let server = Self {
            child: Some(child),
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            bucket: "kvplugin-test".into(),
            access_key,
            secret_key,
            region: "garage".into(),
            _root: root,
        };
        server.wait_until_listening(rpc_port);
        let garage = |args: &[&str]| run_garage(&config, args);
        let node = garage(&["node", "id", "-q"]);
        let node = node.trim().split('@').next().expect("node id").to_string();
        garage(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        garage(&["layout", "apply", "--version", "1"]);
        garage(&["bucket", "create", &server.bucket]);
        garage(&[
            "key",
            "import",
            "--yes",
            "-n",
            "kvplugin-test",
            &server.access_key,
            &server.secret_key,
        ]);
        garage(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &server.bucket,
            "--key",
            "kvplugin-test",
        ]);
        server.wait_until_listening(s3_port);
        server
    }

    /// A plugin configuration pointing at this server's bucket.
    pub fn config(&self) -> PluginConfig {
        let mut config = PluginConfig::default();
        config.store.url = format!("s3://{}", self.bucket);
        config.store.endpoint = Some(self.endpoint.clone());
        config.store.region = Some(self.region.clone());
        config.store.access_key_id = Some(self.access_key.clone());
        config.store.secret_access_key = Some(self.secret_key.clone());
        config.store.allow_http = true;
        config.store.request_timeout_ms = 2000;
        config.chunk_tokens = 64;
        config
    }

    /// Stops the server now (to test a server that dies mid-run).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `dir/garage.toml`: one node keeping its data in `dir` (sqlite metadata), RPC and S3 on
/// the given 127.0.0.1 ports, `replication` copies of every object across the cluster.
fn write_garage_config(
    dir: &std::path::Path,
    replication: usize,
    rpc_port: u16,
    s3_port: u16,
    rpc_secret: &str,
) -> PathBuf {
    let config = dir.join("garage.toml");
    std::fs::write(
        &config,
        format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = {replication}
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
            dir = dir.display()
        ),
    )
    .expect("garage config");
    config
}

/// Starts `garage server` on `config`, its output discarded.
fn spawn_garage(config: &std::path::Path) -> Child {
    Command::new(tools_bin().join("garage"))
        .arg("-c")
        .arg(config)
        .arg("server")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start garage")
}

/// Runs a `garage` command against the node of `config`; panics with its stderr on failure.
fn run_garage(config: &std::path::Path, args: &[&str]) -> String {
    let out = garage_command(config, args);
    assert!(
        out.status.success(),
        "garage {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn garage_command(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(tools_bin().join("garage"))
        .arg("-c")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run garage")
}

/// A Garage cluster of three nodes on 127.0.0.1 (one zone each, replication factor 3: every
/// object on every node, reads and writes need two), S3 served by node 0. Nodes can be killed
/// and started again on their own data.
pub struct GarageCluster {
    nodes: Vec<GarageNode>,
    /// Node 0's S3 endpoint, bucket and key, as one server.
    pub s3: S3Server,
}

struct GarageNode {
    config: PathBuf,
    rpc_port: u16,
    child: Option<Child>,
}

impl GarageNode {
    fn start(&mut self) {
        self.child = Some(spawn_garage(&self.config));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.rpc_port)).is_err() {
            assert!(Instant::now() < deadline, "a garage node did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn garage(&self, args: &[&str]) -> String {
        run_garage(&self.config, args)
    }
}

impl GarageCluster {
    /// Starts three nodes, connects them, lays them out in three zones, and creates bucket
    /// `kvplugin-test` with a key allowed to read and write it.
    pub fn start() -> Self {
        let binary = tools_bin().join("garage");
        assert!(
            binary.is_file(),
            "{} is missing: run `make setup`",
            binary.display()
        );
        let root = tempfile::tempdir().expect("temp dir");
        let secret: String = (0..32).map(|_| format!("{:02x}", rand_byte())).collect();
        let mut nodes = Vec::new();
        let mut s3_ports = Vec::new();
        for i in 0..3 {
            let (s3_port, rpc_port) = (free_port(), free_port());
            let dir = root.path().join(format!("node{i}"));
            std::fs::create_dir_all(&dir).expect("node folder");
            let config = write_garage_config(&dir, 3, rpc_port, s3_port, &secret);
            let mut node = GarageNode {
                config,
                rpc_port,
                child: None,
            };
            node.start();
            nodes.push(node);
            s3_ports.push(s3_port);
        }
        let ids: Vec<String> = nodes
            .iter()
            .map(|n| n.garage(&["node", "id", "-q"]).trim().to_string())
            .collect();
        for id in &ids[1..] {
            nodes[0].garage(&["node", "connect", id]);
        }
        wait_healthy(&nodes[0]);
        for (i, id) in ids.iter().enumerate() {
            let short = id.split('@').next().expect("node id");
            nodes[0].garage(&[
                "layout",
                "assign",
                "-z",
                &format!("dc{i}"),
                "-c",
                "1G",
                short,
            ]);
        }
        nodes[0].garage(&["layout", "apply", "--version", "1"]);
        let access_key = format!("GK{}", &secret[..24]);
        let secret_key = secret.chars().rev().collect::<String>();
        let bucket = "kvplugin-test".to_string();
        // The layout reaches every node in the background: retry the first commands until the
        // cluster takes them.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = garage_command(&nodes[0].config, &["bucket", "create", &bucket]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster never took a bucket: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        nodes[0].garage(&[
            "key",
            "import",
            "--yes",
            "-n",
            "kvplugin-test",
            &access_key,
            &secret_key,
        ]);
        nodes[0].garage(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &bucket,
            "--key",
            "kvplugin-test",
        ]);
        let s3 = S3Server {
            // The nodes are owned by the cluster; this server only names node 0's endpoint.
            child: None,
            endpoint: format!("http://127.0.0.1:{}", s3_ports[0]),
            bucket,
            access_key,
            secret_key,
            region: "garage".into(),
            _root: root,
        };
        s3.wait_until_listening(s3_ports[0]);
        Self { nodes, s3 }
    }

    /// Kills node `i` (1 or 2: node 0 serves the S3 API).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its own data, and waits until the cluster sees it.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].start();
        wait_healthy(&self.nodes[0]);
    }
}

/// Waits until `node` sees every node of the layout up (`garage status` lists no failed node).
fn wait_healthy(node: &GarageNode) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = node.garage(&["status"]);
        if !status.contains("FAILED NODES") && status.matches("127.0.0.1:").count() >= 3 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the garage cluster did not come up: {status}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}
