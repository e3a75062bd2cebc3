"""The agent's L4 proxy: outbound (15001), inbound HBONE (15008) and plaintext (15006)."""
