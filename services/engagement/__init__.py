"""Open and click tracking, pure: signed tokens (tokens), the rewriting of a mail's bodies
(rewrite) and the telling of machine traffic from people (machine). No I/O: the tracker
service (services/tracker) and the sender put them to work.
"""
