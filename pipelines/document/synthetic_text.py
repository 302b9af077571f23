"""Wording of synthetic contracts: parties, clauses of known CUAD categories, and filler prose, all from a seed.

Clause texts are what the gold annotations quote, so they are single paragraphs with no layout of their own.
Filler is deliberately bland (cooperation, reporting, records) so it does not read as one of the categories.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta

_NAME_A = ["Northwind", "Bluestone", "Harborview", "Crescent", "Ironwood", "Silverline", "Meridian", "Oakridge"]
_NAME_B = ["Summit", "Redwood", "Lakeshore", "Granite", "Evergreen", "Pinnacle", "Riverbend", "Cobalt"]
_TRADE = ["Analytics", "Logistics", "Systems", "Holdings", "Software", "Health", "Energy", "Media", "Labs"]
_ENTITY = [("Inc.", "corporation"), ("LLC", "limited liability company"), ("Corp.", "corporation")]
_STATES = ["Delaware", "New York", "California", "Texas", "Illinois", "Washington", "Massachusetts", "Colorado"]
_KINDS = [
    ("MASTER SERVICES AGREEMENT", "Provider", "Customer"),
    ("SOFTWARE LICENSE AGREEMENT", "Licensor", "Licensee"),
    ("SUPPLY AGREEMENT", "Supplier", "Buyer"),
    ("DISTRIBUTION AGREEMENT", "Supplier", "Distributor"),
]
_TERRITORIES = ["the United States", "North America", "the European Union", "the State of California"]
_WORDS = {
    1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 10: "ten", 12: "twelve", 15: "fifteen", 18: "eighteen",
    24: "twenty-four", 30: "thirty", 45: "forty-five", 60: "sixty", 90: "ninety", 120: "one hundred twenty",
    180: "one hundred eighty",
}  # fmt: skip


def words(n: int) -> str:
    return f"{_WORDS[n]} ({n})"


def fmt_date(d: date) -> str:
    return f"{d.strftime('%B')} {d.day}, {d.year}"


@dataclass
class ContractFacts:
    """Everything the clauses mention, drawn once per seed."""

    title: str
    a_role: str
    b_role: str
    party_a: str
    party_b: str
    state_a: str
    state_b: str
    kind_a: str
    kind_b: str
    agreement_date: str
    effective_date: str
    expiration_date: str
    governing_state: str
    territory: str
    ref: str

    @property
    def short_title(self) -> str:
        return self.title.title()


def draw_facts(rng: random.Random) -> ContractFacts:
    title, a_role, b_role = rng.choice(_KINDS)
    first = rng.sample(_NAME_A, 1)[0]
    second = rng.sample(_NAME_B, 1)[0]
    trade_a, trade_b = rng.sample(_TRADE, 2)
    (suf_a, kind_a), (suf_b, kind_b) = rng.choice(_ENTITY), rng.choice(_ENTITY)
    agreed = date(2018, 1, 1) + timedelta(days=rng.randrange(0, 6 * 365))
    effective = agreed + timedelta(days=rng.choice([0, 14, 30]))
    years = rng.choice([2, 3, 5])
    expires = date(effective.year + years, effective.month, 1) - timedelta(days=1)
    return ContractFacts(
        title=title,
        a_role=a_role,
        b_role=b_role,
        party_a=f"{first} {trade_a}, {suf_a}" if suf_a == "Inc." else f"{first} {trade_a} {suf_a}",
        party_b=f"{second} {trade_b}, {suf_b}" if suf_b == "Inc." else f"{second} {trade_b} {suf_b}",
        state_a=rng.choice(_STATES),
        state_b=rng.choice(_STATES),
        kind_a=kind_a,
        kind_b=kind_b,
        agreement_date=fmt_date(agreed),
        effective_date=fmt_date(effective),
        expiration_date=fmt_date(expires),
        governing_state=rng.choice(_STATES),
        territory=rng.choice(_TERRITORIES),
        ref=f"{first[:2].upper()}{second[:2].upper()}-{agreed.year}-{rng.randrange(100, 999)}",
    )


def preamble(f: ContractFacts) -> str:
    return (
        f'This {f.short_title} (the "Agreement") is entered into as of {f.agreement_date} by and between '
        f'{f.party_a}, a {f.state_a} {f.kind_a} ("{f.a_role}"), and {f.party_b}, a {f.state_b} {f.kind_b} '
        f'("{f.b_role}").'
    )


# category -> (heading, variants); variants are format strings over the facts and a few drawn numbers
_CLAUSES: dict[str, tuple[str, list[str]]] = {
    "Effective Date": ("Effective Date", [
        'This Agreement shall become effective on {effective_date} (the "Effective Date").',
        'The obligations of the parties under this Agreement commence on {effective_date} (the "Effective Date").',
    ]),
    "Expiration Date": ("Initial Term", [
        "Unless terminated earlier in accordance with its terms, this Agreement shall expire on {expiration_date}.",
        'The initial term of this Agreement begins on the Effective Date and ends on {expiration_date} '
        '(the "Initial Term").',
    ]),
    "Renewal Term": ("Renewal", [
        "Upon expiration of the initial term, this Agreement shall automatically renew for successive {renew} "
        'year periods (each, a "Renewal Term").',
        "Thereafter, this Agreement will renew automatically for additional {renew} year terms unless "
        "terminated as provided herein.",
    ]),
    "Notice Period to Terminate Renewal": ("Notice of Non-Renewal", [
        "Either party may prevent an automatic renewal by giving the other party written notice of non-renewal at "
        "least {notice} days before the end of the then-current term.",
    ]),
    "Governing Law": ("Governing Law", [
        "This Agreement shall be governed by and construed in accordance with the laws of the State of "
        "{governing_state}, without regard to its conflict of laws principles.",
        "This Agreement and any dispute arising out of it shall be governed by the laws of the State of "
        "{governing_state}.",
    ]),
    "Most Favored Nation": ("Most Favored Pricing", [
        "If {a} offers any other customer pricing for substantially similar services that is lower than the "
        "pricing in this Agreement, {a} shall promptly offer the same pricing to {b}.",
    ]),
    "Non-Compete": ("Non-Competition", [
        "During the term of this Agreement and for {nc_years} years thereafter, {a} shall not, directly or "
        "indirectly, engage in any business that competes with the business of {b} in {territory}.",
    ]),
    "Exclusivity": ("Exclusivity", [
        "During the term of this Agreement, {b} shall obtain all of its requirements for the products and services "
        "described herein exclusively from {a}.",
        "{a} appoints {b} as its exclusive reseller in {territory} and shall not appoint any other reseller in "
        "{territory} during the term.",
    ]),
    "No-Solicit of Customers": ("Non-Solicitation of Customers", [
        "{b} shall not solicit any customer of {a} with whom {b} had contact under this Agreement for a period of "
        "{ns_months} months after termination.",
    ]),
    "No-Solicit of Employees": ("Non-Solicitation of Employees", [
        "During the term of this Agreement and for {ns_months} months thereafter, neither party shall solicit for "
        "employment any employee of the other party who was involved in the performance of this Agreement.",
    ]),
    "Non-Disparagement": ("Non-Disparagement", [
        "Neither party shall make any public statement that disparages the other party or its products, services, "
        "officers or employees.",
    ]),
    "Termination for Convenience": ("Termination for Convenience", [
        "Either party may terminate this Agreement for convenience upon {tfc} days prior written notice to the "
        "other party.",
        "{b} may terminate this Agreement at any time without cause by giving {a} at least {tfc} days written "
        "notice.",
    ]),
    "Rofr/Rofo/Rofn": ("Right of First Refusal", [
        "If {a} proposes to sell the assets used to perform this Agreement, {b} shall have a right of first refusal "
        "to purchase such assets on the same terms offered by any third party.",
    ]),
    "Change of Control": ("Change of Control", [
        "{b} may terminate this Agreement upon written notice if {a} undergoes a change of control, including a "
        "merger or the sale of all or substantially all of its assets.",
    ]),
    "Anti-Assignment": ("Assignment", [
        "Neither party may assign or transfer this Agreement, in whole or in part, without the prior written consent "
        "of the other party, and any attempted assignment without such consent shall be void.",
    ]),
    "Revenue/Profit Sharing": ("Royalties", [
        "{b} shall pay to {a} a royalty equal to {royalty} percent of the net revenue received by {b} from the "
        "resale of the products.",
    ]),
    "Price Restrictions": ("Price Adjustments", [
        "{a} shall not increase the fees set forth in the fee schedule by more than {price_cap} percent in any "
        "contract year.",
    ]),
    "Minimum Commitment": ("Minimum Commitment", [
        "{b} shall purchase no less than {min_units} user licenses in each contract year.",
    ]),
    "Volume Restriction": ("Volume Limits", [
        "{b} shall not process more than {volume} transactions per month through the platform without the prior "
        "written approval of {a}.",
    ]),
    "IP Ownership Assignment": ("Ownership of Deliverables", [
        "All deliverables created by {a} specifically for {b} under this Agreement shall be the sole property of "
        "{b}, and {a} hereby assigns to {b} all right, title and interest therein.",
    ]),
    "Joint IP Ownership": ("Joint Inventions", [
        "Any invention conceived jointly by employees of both parties in the course of this Agreement shall be "
        "jointly owned by the parties.",
    ]),
    "License Grant": ("License Grant", [
        "Subject to the terms of this Agreement, {a} grants to {b} a non-exclusive license to use the software for "
        "its internal business purposes during the term.",
    ]),
    "Non-Transferable License": ("License Restrictions", [
        "The license granted in this Agreement is non-transferable and may not be sublicensed except as expressly "
        "permitted herein.",
    ]),
    "Affiliate License-Licensee": ("Use by Affiliates", [
        "{b} may permit its affiliates to use the software under the license granted herein, provided that {b} "
        "remains responsible for their compliance with this Agreement.",
    ]),
    "Irrevocable or Perpetual License": ("Perpetual License", [
        "Upon payment of all fees, the license granted to {b} for the deliverables shall be perpetual and "
        "irrevocable.",
    ]),
    "Source Code Escrow": ("Source Code Escrow", [
        "{a} shall deposit the source code of the software with a mutually agreed escrow agent and update the "
        "deposit with each major release.",
    ]),
    "Post-Termination Services": ("Transition Assistance", [
        "Upon expiration or termination of this Agreement, {a} shall provide reasonable transition assistance to "
        "{b} for a period of up to {transition} days at the then-current rates.",
    ]),
    "Audit Rights": ("Audit Rights", [
        "{b} may, upon {audit_notice} days written notice and not more than once per calendar year, audit the "
        "books and records of {a} relating to the fees charged under this Agreement.",
    ]),
    "Uncapped Liability": ("Exclusions from Limitation", [
        "The limitations of liability in this Agreement shall not apply to a party's breach of its "
        "confidentiality obligations or to its indemnification obligations.",
    ]),
    "Cap on Liability": ("Limitation of Liability", [
        "In no event shall either party's aggregate liability arising out of this Agreement exceed the total fees "
        "paid by {b} to {a} during the {cap_months} months preceding the claim.",
    ]),
    "Liquidated Damages": ("Liquidated Damages", [
        "If {a} fails to meet a delivery date, {a} shall pay {b} liquidated damages of {ld_amount} for each day of "
        "delay, up to a maximum of {ld_days} days.",
    ]),
    "Warranty Duration": ("Warranty", [
        "{a} warrants that the services will conform to the documentation for a period of {warranty} days "
        "following acceptance.",
    ]),
    "Insurance": ("Insurance", [
        "{a} shall maintain, at its own expense, commercial general liability insurance with limits of not less "
        "than {insurance} per occurrence during the term of this Agreement.",
    ]),
    "Covenant Not to Sue": ("Covenant Not to Sue", [
        "{b} shall not bring any claim or action against {a} alleging that the software infringes any patent owned "
        "or controlled by {b}.",
    ]),
    "Third Party Beneficiary": ("No Third Party Beneficiaries", [
        "Nothing in this Agreement shall confer any right, benefit or remedy upon any person other than the "
        "parties and their permitted successors and assigns.",
    ]),
}  # fmt: skip

CLAUSE_CATEGORIES: list[str] = list(_CLAUSES)

_GROUPS = {
    "Term and Termination": ["Effective Date", "Expiration Date", "Renewal Term", "Notice Period to Terminate Renewal",
                             "Termination for Convenience", "Change of Control", "Post-Termination Services"],
    "Restrictive Covenants": ["Non-Compete", "Exclusivity", "No-Solicit of Customers", "No-Solicit of Employees",
                              "Non-Disparagement", "Rofr/Rofo/Rofn", "Covenant Not to Sue"],
    "Fees and Commercial Terms": ["Most Favored Nation", "Revenue/Profit Sharing", "Price Restrictions",
                                  "Minimum Commitment", "Volume Restriction", "Audit Rights"],
    "Intellectual Property": ["IP Ownership Assignment", "Joint IP Ownership", "License Grant",
                              "Non-Transferable License", "Affiliate License-Licensee",
                              "Irrevocable or Perpetual License", "Source Code Escrow"],
    "Liability and Risk": ["Uncapped Liability", "Cap on Liability", "Liquidated Damages", "Warranty Duration",
                           "Insurance"],
    "General Provisions": ["Governing Law", "Anti-Assignment", "Third Party Beneficiary"],
}  # fmt: skip
_GROUP_OF = {c: g for g, cs in _GROUPS.items() for c in cs}


def group_title(category: str) -> str:
    """Title of the top-level section a clause of this category sits in."""
    return _GROUP_OF.get(category, "General Provisions")
PREAMBLE_CATEGORIES = ["Document Name", "Parties", "Agreement Date"]


def clause(category: str, f: ContractFacts, rng: random.Random) -> tuple[str, str]:
    """(heading, clause text) for a category, wording and numbers drawn from ``rng``."""
    heading, variants = _CLAUSES[category]
    values = {
        **vars(f),
        "a": f.a_role,
        "b": f.b_role,
        "renew": words(rng.choice([1, 2, 3])),
        "notice": words(rng.choice([30, 60, 90])),
        "nc_years": words(rng.choice([2, 3])),
        "ns_months": words(rng.choice([12, 18, 24])),
        "tfc": words(rng.choice([30, 60, 90])),
        "royalty": words(rng.choice([3, 5, 10, 15])),
        "price_cap": words(rng.choice([3, 4, 5])),
        "min_units": f"{rng.choice([250, 500, 1000, 2500]):,}",
        "volume": f"{rng.choice([50, 100, 250]) * 1000:,}",
        "transition": words(rng.choice([60, 90, 180])),
        "audit_notice": words(rng.choice([15, 30, 45])),
        "cap_months": words(rng.choice([12, 24])),
        "ld_amount": f"${rng.choice([500, 1000, 2500]):,}",
        "ld_days": words(rng.choice([10, 30])),
        "warranty": words(rng.choice([30, 60, 90, 180])),
        "insurance": f"${rng.choice([1, 2, 5])},000,000",
    }
    return heading, rng.choice(variants).format(**values)


_SUBJECTS = ["Each party", "The parties", "{a}", "{b}", "The project managers", "Each party's representatives"]
_VERBS = [
    "shall cooperate in good faith with respect to",
    "shall keep accurate written records of",
    "shall meet at reasonable intervals to review",
    "shall use commercially reasonable efforts to coordinate",
    "shall provide timely information regarding",
    "may propose written updates to",
    "shall document in reasonable detail",
    "shall promptly notify the other party of any material delay in",
]
_OBJECTS = [
    "the scheduling of the activities described in the applicable statement of work",
    "the status of open requests and planned deliverables",
    "the operational procedures that apply to the day-to-day performance of this Agreement",
    "the staffing and resourcing plan for each phase of the project",
    "the reports and documentation delivered under this Agreement",
    "the communication protocols agreed by the steering committee",
    "any change requests submitted in accordance with the change procedure",
    "the acceptance criteria set out in the relevant work order",
]
_TAILS = [
    "",
    ", in each case in a manner consistent with good industry practice",
    ", as reasonably requested by the other party from time to time",
    ", taking into account the priorities agreed at the most recent review meeting",
    ", and such obligations shall be performed at no additional charge",
    ", subject to the reasonable security policies of the receiving party",
]


def filler_paragraph(f: ContractFacts, rng: random.Random, sentences: tuple[int, int] = (3, 5)) -> str:
    """A paragraph of neutral operational prose."""
    out = []
    for _ in range(rng.randint(*sentences)):
        subject = rng.choice(_SUBJECTS).format(a=f.a_role, b=f.b_role)
        out.append(f"{subject} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}.")
    return " ".join(out)


GENERIC_SECTIONS = [
    "Services", "Statements of Work", "Project Governance", "Personnel", "Change Procedure", "Acceptance",
    "Reporting", "Service Levels", "Cooperation", "Records", "Security Procedures", "Documentation",
    "Training", "Subcontractors", "Data Handling", "Business Continuity", "Quality Assurance", "Escalation",
    "Meetings", "Facilities", "Equipment", "Compliance with Policies", "Performance Reviews", "Communications",
]  # fmt: skip
GENERIC_SUBSECTIONS = ["General", "Scope", "Procedures", "Responsibilities", "Timing", "Updates", "Review"]

DEFINITIONS = [
    '"Affiliate" means any entity that directly or indirectly controls, is controlled by, or is under common '
    "control with a party.",
    '"Confidential Information" means all non-public information disclosed by one party to the other in '
    "connection with this Agreement.",
    '"Deliverables" means the reports, materials and other work product provided under a statement of work.',
    '"Documentation" means the user guides and specifications made available for the products and services.',
    '"Statement of Work" means a document executed by both parties that describes specific services.',
]
