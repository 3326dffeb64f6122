"""Redis-backed state both sides share: statuses, dedup claims, cancel marks."""
