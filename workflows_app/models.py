"""Workflow definitions and runs arrive with the workflows issue (DESIGN §9)."""

from __future__ import annotations
