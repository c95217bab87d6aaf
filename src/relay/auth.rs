//! Mutual authentication of two kvgate replicas at connect: each proves it holds the shared
//! secret by an HMAC-SHA256 over both sides' fresh nonces (RFC 2104, on `sha2`), so a
//! recorded handshake cannot be replayed and neither side learns anything it could reuse.

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::frame::{self, MAX_HANDSHAKE_FRAME};
use super::{FrameReader, Keys, RelayError};

/// A replica's id: random per process, so a replica that finds itself among its peers
/// (the headless Service lists it too) knows to skip it.
pub type ReplicaId = [u8; 16];
type Nonce = [u8; 32];
pub type Mac = [u8; 32];

const CLIENT: &[u8] = b"kvgate-relay client";
const SERVER: &[u8] = b"kvgate-relay server";
/// Shorter secrets are refused at start: they could be guessed.
pub const MIN_SECRET_BYTES: usize = 16;

/// HMAC-SHA256 of the concatenated `parts`.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> Mac {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    for part in parts {
        inner.update(part);
    }
    let inner = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner);
    let mut mac = [0u8; 32];
    mac.copy_from_slice(&outer.finalize());
    mac
}

/// Equality whose time does not depend on where the inputs differ.
fn same(a: &Mac, b: &Mac) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn nonce() -> Nonce {
    rand::random()
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

/// The accepting side: checks the client's proof by the current secret or, during a
/// rotation, the previous one, then proves itself with the same. Returns the client's id.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FrameReader<S>,
    keys: &Keys,
    me: &ReplicaId,
) -> Result<ReplicaId, RelayError> {
    let server_nonce = nonce();
    let mut out = bytes::BytesMut::new();
    frame::encode(&mut out, frame::HELLO, |b| {
        b.extend_from_slice(&[frame::VERSION]);
        b.extend_from_slice(me);
        b.extend_from_slice(&server_nonce);
    });
    stream.inner.write_all(&out).await?;
    let body = stream.expect(frame::AUTH, MAX_HANDSHAKE_FRAME).await?;
    if body.len() != 16 + 32 + 32 {
        return Err(RelayError::Handshake("malformed Auth"));
    }
    let client: ReplicaId = array(&body[..16]);
    let client_nonce: Nonce = array(&body[16..48]);
    let proof: Mac = array(&body[48..80]);
    let proves = |secret: &[u8]| {
        same(
            &proof,
            &hmac(secret, &[CLIENT, &server_nonce, &client_nonce, &client]),
        )
    };
    let secret = std::iter::once(&*keys.current)
        .chain(keys.previous())
        .find(|secret| proves(secret))
        .ok_or(RelayError::Unauthenticated)?;
    out.clear();
    let answer = hmac(secret, &[SERVER, &client_nonce, &server_nonce, me]);
    frame::encode(&mut out, frame::WELCOME, |b| b.extend_from_slice(&answer));
    stream.inner.write_all(&out).await?;
    Ok(client)
}

/// The connecting side: proves itself, then checks the server's proof. Returns the server's
/// id; [`RelayError::Myself`] when the peer is this very process.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FrameReader<S>,
    secret: &[u8],
    me: &ReplicaId,
) -> Result<ReplicaId, RelayError> {
    let body = stream.expect(frame::HELLO, MAX_HANDSHAKE_FRAME).await?;
    if body.len() != 1 + 16 + 32 {
        return Err(RelayError::Handshake("malformed Hello"));
    }
    if body[0] != frame::VERSION {
        return Err(RelayError::Version(body[0]));
    }
    let server: ReplicaId = array(&body[1..17]);
    if &server == me {
        return Err(RelayError::Myself);
    }
    let server_nonce: Nonce = array(&body[17..49]);
    let client_nonce = nonce();
    let proof = hmac(secret, &[CLIENT, &server_nonce, &client_nonce, me]);
    let mut out = bytes::BytesMut::new();
    frame::encode(&mut out, frame::AUTH, |b| {
        b.extend_from_slice(me);
        b.extend_from_slice(&client_nonce);
        b.extend_from_slice(&proof);
    });
    stream.inner.write_all(&out).await?;
    let body = stream.expect(frame::WELCOME, MAX_HANDSHAKE_FRAME).await?;
    if body.len() != 32
        || !same(
            &array(&body),
            &hmac(secret, &[SERVER, &client_nonce, &server_nonce, &server]),
        )
    {
        return Err(RelayError::Unauthenticated);
    }
    Ok(server)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        let mac = hmac(
            &[0xaa; 131],
            &[b"Test Using Larger Than Block-Size Key - Hash Key First"],
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[tokio::test]
    async fn replicas_with_the_secret_agree_and_others_are_refused() {
        let secret = b"0123456789abcdef-shared";
        let server_keys = keys(secret, None);
        let (a, b) = tokio::io::duplex(1024);
        let (mut a, mut b) = (FrameReader::new(a), FrameReader::new(b));
        let (server_id, client_id) = ([1u8; 16], [2u8; 16]);
        let (accepted, connected) = tokio::join!(
            accept(&mut a, &server_keys, &server_id),
            connect(&mut b, secret, &client_id)
        );
        assert_eq!(accepted.expect("accepted"), client_id);
        assert_eq!(connected.expect("connected"), server_id);

        // The accepting side drops the connection on a failed proof (as the listener does),
        // which ends the client's wait for Welcome.
        let (a, b) = tokio::io::duplex(1024);
        let (accepted, connected) = tokio::join!(
            async move { accept(&mut FrameReader::new(a), &keys(secret, None), &server_id).await },
            async move {
                let wrong = b"another secret of 16+ bytes";
                connect(&mut FrameReader::new(b), wrong, &client_id).await
            }
        );
        assert!(matches!(accepted, Err(RelayError::Unauthenticated)));
        assert!(connected.is_err());

        // A replica that dials itself (it is among its own peers) learns it at Hello.
        let (a, b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let mut a = FrameReader::new(a);
            accept(&mut a, &keys(secret, None), &server_id)
                .await
                .map(|_| ())
        });
        let mut b = FrameReader::new(b);
        let connected = connect(&mut b, secret, &server_id).await;
        assert!(matches!(connected, Err(RelayError::Myself)));
        drop(b);
        assert!(server.await.expect("joined").is_err());
    }

    fn keys(current: &[u8], previous: Option<(&[u8], Instant)>) -> Keys {
        Keys {
            current: current.into(),
            previous: previous.map(|(key, until)| (key.into(), until)),
        }
    }

    async fn handshake(server: &Keys, client: &[u8]) -> Result<ReplicaId, RelayError> {
        let (a, b) = tokio::io::duplex(1024);
        let (accepted, connected) = tokio::join!(
            async move { accept(&mut FrameReader::new(a), server, &[1u8; 16]).await },
            async move { connect(&mut FrameReader::new(b), client, &[2u8; 16]).await }
        );
        connected?;
        accepted
    }

    #[tokio::test]
    async fn during_a_rotation_the_previous_secret_is_accepted_until_its_deadline() {
        let (old, new) = (
            &b"the secret before rotation"[..],
            &b"the secret after rotation!"[..],
        );
        let later = Instant::now() + Duration::from_secs(60);
        let rotated = keys(new, Some((old, later)));
        assert!(handshake(&rotated, new).await.is_ok(), "the new secret");
        assert!(
            handshake(&rotated, old).await.is_ok(),
            "a peer not rotated yet"
        );
        let stranger = handshake(&rotated, b"neither of the two secrets").await;
        assert!(stranger.is_err(), "a third secret is refused");
        let expired = keys(new, Some((old, Instant::now())));
        assert!(handshake(&expired, old).await.is_err(), "past the grace");
        assert!(handshake(&expired, new).await.is_ok());
    }
}
