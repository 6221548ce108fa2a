//! Real S3 servers on 127.0.0.1 for the tests: started by the test, stopped when dropped.
//!
//! s3s-fs 0.14.1 (`make setup` installs it into `$KVPLUGIN_TOOLS/bin`, default
//! `~/.cache/mistralrs-kvplugin/tools/bin`) serves a folder as S3 and checks request signatures.

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
    _root: tempfile::TempDir,
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

    /// A plugin configuration pointing at this server's bucket.
    pub fn config(&self) -> PluginConfig {
        let mut config = PluginConfig::default();
        config.store.url = format!("s3://{}", self.bucket);
        config.store.endpoint = Some(self.endpoint.clone());
        config.store.region = Some("us-east-1".into());
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
