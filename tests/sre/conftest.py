"""The throwaway PostgreSQL server of the journal tests, shared."""

from journal.conftest import pg_db as pg_db
from journal.conftest import pg_server as pg_server
