//! The http source: the bench process serves the test files on 127.0.0.1.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
};

/// Serves the files of `dir` on 127.0.0.1 (a thread per connection, `std::io::copy` from the
/// file, which Linux turns into `sendfile`): `GET /<name>` answers the file with a
/// Content-Length.
pub fn serve(dir: PathBuf) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    return;
                }
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let name = request.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
                let mut out = &stream;
                let file = (!name.contains('/') && !name.is_empty()).then(|| std::fs::File::open(dir.join(&name)));
                match file {
                    Some(Ok(mut file)) => {
                        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
                        if out.write_all(head.as_bytes()).is_ok() {
                            let _ = std::io::copy(&mut file, &mut out);
                        }
                    }
                    _ => {
                        let _ =
                            out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    }
                }
            });
        }
    });
    addr
}

/// The URL `serve` answers `path` (a file of its directory) at.
pub fn http_url(server: SocketAddr, path: &Path) -> String {
    format!("http://{server}/{}", path.file_name().unwrap().to_string_lossy())
}

pub fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}
