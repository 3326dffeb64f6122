"""The job history: every job's life in a PostgreSQL table (``LEVERET_HISTORY_URL``).

``schema`` holds the versioned migrations (``leveret history migrate``), ``store`` the
``HistoryStore`` the writer, the API, the CLI and the console use, ``writer`` the process
``leveret history APP`` runs: it consumes the outcome events from ``<exchange>.history`` and
upserts them in batches. asyncpg (the ``history`` extra) is imported only by these modules.
"""
