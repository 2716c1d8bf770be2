"""`garrison.store.safe_url`: what messages show of a store URL (no password)."""

from __future__ import annotations

import pytest

from garrison.errors import ConfigurationError
from garrison.store import open_store, safe_url


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://app:s3cret@db.internal:5432/prod?schema=orders",
     "postgresql://app@db.internal:5432/prod?schema=orders"),
    ("postgresql://app@db/prod?password=s3cret&schema=orders&sslpassword=k3y",
     "postgresql://app@db/prod?schema=orders"),
    ("postgres://a:b:c@h/d", "postgres://a@h/d"),  # a colon in the password
    ("postgresql://app@db/prod", "postgresql://app@db/prod"),
    ("sqlite:///var/lib/garrison.db?synchronous=NORMAL",
     "sqlite:///var/lib/garrison.db?synchronous=NORMAL"),
    ("postgresql:///prod?host=/tmp&user=app&password=x",  # no host part: // kept
     "postgresql:///prod?host=/tmp&user=app"),
    ("host=db user=app password=s3cret dbname=prod",  # a libpq DSN, not a URL
     "host=db user=app password=*** dbname=prod"),
    ("mysql://u:p@[::1/db", "mysql://(unparseable)"),
])
def test_safe_url_drops_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_a_bad_postgres_url_is_reported_without_its_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_store("postgresql://app:s3cret@db/prod?schema=Not-An-Identifier")
    assert "s3cret" not in str(caught.value) and "app@db/prod" in str(caught.value)
    assert "s3cret" not in str(getattr(caught.value, "url", ""))


def test_a_dsn_that_is_not_a_url_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_store("host=db user=app password=s3cret dbname=prod")
    assert "s3cret" not in str(caught.value) and "not a URL" in str(caught.value)
