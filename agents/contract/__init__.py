"""Contract extraction: long PDFs -> clauses (CUAD's 41 categories or a user's JSON schema) with verified page
citations, an annotated PDF and a Markdown summary."""
