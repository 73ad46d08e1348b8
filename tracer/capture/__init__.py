"""The capture layer: running collectors around a command (``session``) into a capture directory
(``directory``), the single source of truth that attribution reads."""
