//! The Kubernetes client every binary builds: from `--kubeconfig` when given, else as client-go infers it.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::{Client, Config};
use thiserror::Error;

/// Why no client could be made.
#[derive(Debug, Error)]
pub enum KubeClientError {
    #[error("--kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration (in a pod: the service account; elsewhere: --kubeconfig or KUBECONFIG): {0}"
    )]
    Infer(#[source] kube::Error),
    #[error("Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// A client from `kubeconfig` (upstream's `--kubeconfig`) when set; otherwise `KUBECONFIG`,
/// `~/.kube/config` or the pod's service account, as client-go tries them.
pub async fn kube_client(kubeconfig: Option<&Path>) -> Result<Client, KubeClientError> {
    let Some(path) = kubeconfig else {
        return Client::try_default().await.map_err(KubeClientError::Infer);
    };
    let named = |source| KubeClientError::Kubeconfig {
        path: path.display().to_string(),
        source,
    };
    let kc = Kubeconfig::read_from(path).map_err(named)?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(named)?;
    Client::try_from(cfg).map_err(KubeClientError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_kubeconfig_is_named() {
        let Err(e) = kube_client(Some(Path::new("/nonexistent/kubeconfig"))).await else {
            panic!("a missing kubeconfig made a client");
        };
        let e = e.to_string();
        assert!(e.starts_with("--kubeconfig /nonexistent/kubeconfig"), "{e}");
    }
}
