//! What the controller's unit tests share.

use kmsgrant_kms::{ClientConfig, Credentials, KmsClient, Project};

/// A client of a running emulator, signed with its access key.
pub fn emulator_client(emulator: &kms_emulator::RunningEmulator) -> KmsClient {
    let settings = emulator.config();
    let mut config = ClientConfig::new(
        emulator.base_url(),
        Project::Id(settings.project_id.clone()),
        Credentials::AccessKey {
            keys: kmsgrant_kms_signer::AccessKeyPair::new(
                &settings.access_key,
                &settings.secret_key,
            ),
            security_token: None,
        },
    );
    config.region = settings.region.clone();
    config.allow_http = true;
    KmsClient::new(config).unwrap()
}
