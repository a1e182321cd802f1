//! Test certificates (rcgen): a CA and the leaf certificates it signs.
use std::path::Path;

pub struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate and key (PEM) named `name` for `sans`, for a server or (`client`) a client.
    pub fn leaf(&self, name: &str, sans: &[&str], client: bool) -> (String, String) {
        use rcgen::ExtendedKeyUsagePurpose as Eku;
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = rcgen::CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.extended_key_usages = vec![if client {
            Eku::ClientAuth
        } else {
            Eku::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// [`Ca::leaf`], written as `dir/<name>.pem` and `dir/<name>.key`.
    pub fn write_leaf(&self, dir: &Path, name: &str, sans: &[&str], client: bool) {
        let (cert, key) = self.leaf(name, sans, client);
        std::fs::write(dir.join(format!("{name}.pem")), cert).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    }
}
